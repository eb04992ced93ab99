"""Build the test fixtures for per-row explanations (reason codes).

A model's explained output is g(x) = log(p1) - log(p0), the log-odds of column 1 of its
probabilities output. Its `contributions` are the exact Shapley values of the game
v(S) = g(x with the features outside S set to the baseline row's values): they sum to
g(x) - g(baseline), a feature equal to the baseline gets 0, and for a linear g they are
w_i (x_i - b_i).

The script writes a model repository of its own, apart from tests/fixtures/models so that the
tests loading that whole repository are unaffected:

* ``tests/fixtures/explain/models/<name>/1/model.onnx``, ``<name>/config.yaml`` (features and an
  ``explain:`` section with the reason codes of ``build_models.reasons``) and
  ``<name>/baseline.json`` (the training rows' per-feature mean, float32, NaNs left out), for
  ``linear`` (StandardScaler + LogisticRegression, skl2onnx: Scaler -> LinearClassifier),
  ``linear_standard`` (the same fitted pipeline in standard operators: Sub, Div, Gemm, Sigmoid),
  ``gbt_sklearn`` (HistGradientBoostingClassifier) and ``gbt_lightgbm`` (LightGBM, converted by
  onnxmltools), both trained with about 10% of three numeric features missing (NaN) so that the
  trees carry missing-value branches, and ``mlp`` (StandardScaler + MLPClassifier (32, 16)).
* ``tests/fixtures/explain/expected/<name>.json``: rows (held-out rows with all but k features
  set to the baseline; for the tree models two more rows with missing values, written as
  null), the differing features, g(x), g(baseline) and the exact Shapley values, computed by
  brute force over all 2^k coalitions with onnxruntime, and cross-checked against the shap
  package (its exact explainer on the same ONNX model, and for the tree models its tree
  explainer on the native model).

Run from the repository root, with the packages in ``scripts/requirements-models.txt``:

    python3 scripts/build_explain_fixtures.py

Training is seeded, so reruns regenerate the same files.
"""

import contextlib
import json
import math
import sys
from pathlib import Path

import lightgbm
import numpy as np
import onnx
import onnxruntime as ort
import shap
from onnx.helper import get_attribute_value, make_opsetid
from onnxmltools import convert_lightgbm
from onnxmltools.convert.common.data_types import FloatTensorType as MLFloatTensorType
from skl2onnx.common import tree_ensemble
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_models as bm  # noqa: E402

EXPLAIN = bm.ROOT / "tests/fixtures/explain"
VERSION = 1
PLAIN = ["label", "probabilities"]
# Features given missing values in the tree models' training rows, and the share missing.
MISSING_FEATURES = ("duration_months", "credit_amount", "age_years")
MISSING_RATE = 0.1
# Number of features kept from the held-out row (the rest set to the baseline), one per row.
KS = (1, 2, 3, 4, 6, 8, 10, 12, 12, 12)
# Tree models only: rows with missing values, as (k, features among the k set to NaN).
MISSING_ROWS = ((6, ("duration_months",)), (8, ("credit_amount", "age_years")))
# The rows where g(x) is compared with log(p1 / (1 - p1)): p1 away from 0 and 1.
P_MODERATE = (1e-3, 1 - 1e-3)
# Smallest batch scored (see LogOdds).
MIN_BATCH = 64
# shap's exact explainer evaluates the same ONNX function: only the summation order differs.
SHAP_EXACT_TOL = 1e-6
# shap's tree explainer walks the native trees in float64; onnxruntime sums float32 leaf values
# and compares float32 thresholds, and its probabilities are float32.
SHAP_TREE_TOL = 1e-4


@contextlib.contextmanager
def skl2onnx_missing_tracks_as_ints():
    """skl2onnx 1.20 passes Python bools for the leaves' nodes_missing_value_tracks_true when it
    converts HistGradientBoosting trees, which onnx 1.23's make_attribute rejects for an ints
    attribute. Hand it ints while a model is exported; branch values are unchanged."""
    add_node = tree_ensemble.add_node

    def add_node_int(*args, nodes_missing_value_tracks_true=0, **kwargs):
        return add_node(*args, nodes_missing_value_tracks_true=int(nodes_missing_value_tracks_true),
                        **kwargs)

    tree_ensemble.add_node = add_node_int
    try:
        yield
    finally:
        tree_ensemble.add_node = add_node


def tidy_opsets(onx):
    """Opset imports deduplicated and sorted by domain (as build_models.export writes them)."""
    versions = {}
    for o in onx.opset_import:
        versions[o.domain] = max(o.version, versions.get(o.domain, 0))
    del onx.opset_import[:]
    onx.opset_import.extend(make_opsetid(d, v) for d, v in sorted(versions.items()))
    return onx


def export_lightgbm(model, n_features, path):
    # onnxmltools 1.16 accepts target opsets up to 15; the graph it writes imports opset 9 and
    # ai.onnx.ml 1.
    onx = convert_lightgbm(model, initial_types=[("input", MLFloatTensorType([None, n_features]))],
                           zipmap=False, target_opset=15)
    onx.graph.name = "gbt_lightgbm"  # the converter names the graph with a random UUID
    # It declares `label` as [1]; it has a row per input row (onnxruntime warns on every larger
    # batch otherwise). Declare it [N] with N open, as skl2onnx does.
    (label,) = [o for o in onx.graph.output if o.name == "label"]
    (dim,) = label.type.tensor_type.shape.dim
    dim.Clear()
    del onx.graph.value_info[:]
    tidy_opsets(onx)
    onnx.checker.check_model(onx, full_check=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onx.SerializeToString())


def with_missing(X, features, rng):
    """A copy of X with about MISSING_RATE of each MISSING_FEATURES column set to NaN."""
    X = X.copy()
    for name in MISSING_FEATURES:
        X[rng.random(len(X)) < MISSING_RATE, features.index(name)] = np.nan
    return X


def describe_graph(path):
    """Op types in graph order, and the tree ensemble's attributes where there is one."""
    model = onnx.load(str(path))
    facts = {"ops": [n.op_type for n in model.graph.node],
             "opsets": {o.domain or "ai.onnx": o.version for o in model.opset_import},
             "ir_version": model.ir_version}
    trees = [n for n in model.graph.node if n.op_type.startswith("TreeEnsemble")]
    if trees:
        (node,) = trees
        attrs = {a.name: get_attribute_value(a) for a in node.attribute}
        post = attrs.get("post_transform", b"NONE")
        facts.update({
            "tree_op": node.op_type,
            "post_transform": post.decode() if isinstance(post, bytes) else post,
            "missing_tracks_true": int(sum(attrs.get("nodes_missing_value_tracks_true", []))),
            "class_ids": sorted(set(attrs.get("class_ids", []))),
            "classlabels": list(attrs.get("classlabels_int64s", [])),
            "base_values": [float(v) for v in attrs.get("base_values", [])],
            "n_trees": len(set(attrs.get("nodes_treeids", []))),
        })
    return facts


def probabilities_output(session):
    """The name of the float [N, 2] output."""
    names = [o.name for o in session.get_outputs()
             if o.type == "tensor(float)" and len(o.shape) == 2 and o.shape[1] in (2, None)]
    assert len(names) == 1, [(o.name, o.type, o.shape) for o in session.get_outputs()]
    return names[0]


class LogOdds:
    """g(rows) = log(p1) - log(p0) in float64, from the model's float32 probabilities.

    With more than one thread, onnxruntime 1.31's TreeEnsemble operators score batches of up to
    50 rows another way than larger batches (one thread scores every batch like the larger
    ones): probabilities differ by up to about 1e-7. Smaller batches are padded to MIN_BATCH
    rows, so that a row scores the same in every batch and the values and Shapley values here
    come from one function whatever the batching."""

    def __init__(self, path):
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.output = probabilities_output(self.session)

    def probabilities(self, rows):
        rows = np.ascontiguousarray(rows, np.float32)
        n = len(rows)
        if n < MIN_BATCH:
            rows = np.concatenate([rows, np.repeat(rows[-1:], MIN_BATCH - n, axis=0)])
        return self.session.run([self.output], {"input": rows})[0][:n].astype(np.float64)

    def __call__(self, rows):
        p = self.probabilities(rows)
        g = np.log(p[:, 1]) - np.log(p[:, 0])
        assert np.isfinite(g).all(), "a probability of 0 or 1"
        return g


def fixture_rows(X_held, baseline, rng, missing_rows, features):
    """Held-out rows with every feature but k set to the baseline value (see KS), then the rows
    with missing values. Returns (rows [n, n_features] float32, chosen feature indices)."""
    rows, kept = [], []
    specs = [(k, ()) for k in KS] + list(missing_rows)
    for r, (k, missing) in enumerate(specs):
        x = X_held[r]
        forced = [features.index(name) for name in missing]
        candidates = np.setdiff1d(np.flatnonzero(x != baseline), forced)
        extra = rng.choice(candidates, size=min(k - len(forced), len(candidates)), replace=False)
        chosen = np.sort(np.concatenate([forced, extra]).astype(np.int64))
        z = baseline.copy()
        z[chosen] = x[chosen]
        z[forced] = np.nan
        rows.append(z)
        kept.append(chosen)
    return np.array(rows, np.float32), kept


def shapley(g, x, baseline):
    """Exact Shapley values by brute force: g on all 2^k hybrids of x and the baseline (one
    onnxruntime run), where k is the number of features where x differs from the baseline.
    Returns (phi [n_features] float64, differing indices, v(all), v(none))."""
    differing = np.flatnonzero(~(x == baseline))  # NaN differs
    k = len(differing)
    masks = np.arange(1 << k)
    bits = (masks[:, None] >> np.arange(k)) & 1  # [2^k, k]: bit j = feature differing[j] from x
    hybrids = np.repeat(baseline[None, :], len(masks), axis=0)
    for j, f in enumerate(differing):
        hybrids[bits[:, j] == 1, f] = x[f]
    v = g(hybrids)
    size = bits.sum(axis=1)
    # |S|! (k - |S| - 1)! / k! for a coalition S of the other features
    weight = np.array([math.factorial(s) * math.factorial(k - s - 1) / math.factorial(k)
                       for s in range(k)])
    phi = np.zeros(len(x))
    for j, f in enumerate(differing):
        without = masks[bits[:, j] == 0]
        phi[f] = math.fsum(weight[size[without]] * (v[without | (1 << j)] - v[without]))
    return phi, differing, v[-1], v[0]


def shap_exact(g, baseline, rows):
    """shap's exact explainer on g, masking with the one baseline row."""
    masker = shap.maskers.Independent(baseline[None, :].astype(np.float64), max_samples=1)
    explainer = shap.explainers.Exact(g, masker)
    return np.asarray(explainer(rows.astype(np.float64)).values, np.float64)


def shap_tree(native, baseline, rows):
    """shap's interventional tree explainer on the native model, in raw (log-odds) space."""
    explainer = shap.TreeExplainer(native, data=baseline[None, :].astype(np.float64),
                                   feature_perturbation="interventional", model_output="raw")
    values = explainer.shap_values(rows.astype(np.float64))
    if isinstance(values, list):  # one array per class in some shap versions
        values = values[-1]
    values = np.asarray(values, np.float64)
    if values.ndim == 3:  # [rows, features, classes]
        values = values[..., -1]
    return values


def check_linear(pipeline, rows, baseline, contributions):
    """For a linear g the Shapley values are w_i (x_i - b_i), w the weights on the raw features."""
    scaler, clf = pipeline.named_steps["scale"], pipeline.named_steps["clf"]
    weights = clf.coef_[0] / scaler.scale_
    expected = weights * (rows.astype(np.float64) - baseline.astype(np.float64))
    worst = float(np.abs(expected - contributions).max())
    assert worst < 1e-5, f"contributions differ from w (x - b) by {worst}"
    return worst


def json_row(row):
    """float32 values exactly (JSON numbers), NaN as null."""
    return [None if math.isnan(v) else v for v in row.astype(np.float32).tolist()]


def check_against_native(native, g, X_held, X_held_missing, is_tree):
    """The ONNX model's probabilities match the native model's (the tree models' also with
    missing values)."""
    worst = 0.0
    for X in (X_held, X_held_missing) if is_tree else (X_held,):
        expected = native.predict_proba(X)
        worst = max(worst, float(np.abs(g.probabilities(X) - expected).max()))
    assert worst < 1e-5, f"ONNX probabilities differ from the native model's by {worst}"
    return worst


def explain_model(name, path, native, baseline, X_held, features, is_tree, is_logistic):
    g = LogOdds(path)
    rng = np.random.default_rng(bm.SEED)  # the same choices of kept features for every model
    rows, kept = fixture_rows(X_held, baseline, rng, MISSING_ROWS if is_tree else (), features)
    base_value = float(g(baseline[None, :])[0])
    values, contributions, differing = [], [], []
    for z, chosen in zip(rows, kept):
        phi, diff, v_all, v_none = shapley(g, z, baseline)
        assert list(diff) == list(chosen), (diff, chosen)
        assert v_none == base_value, (v_none, base_value)  # the baseline row, in another batch
        g_x = float(g(z[None, :])[0])
        assert abs(v_all - g_x) <= 1e-12 * max(1.0, abs(g_x)), (v_all, g_x)
        # Local accuracy (efficiency): holds by construction, up to rounding.
        assert abs(math.fsum(phi) - (g_x - base_value)) < 1e-9, (math.fsum(phi), g_x - base_value)
        assert np.all(phi[np.setdiff1d(np.arange(len(z)), diff)] == 0.0)
        values.append(g_x)
        contributions.append(phi)
        differing.append([int(i) for i in diff])
    contributions = np.array(contributions)
    if is_logistic:  # one sigmoid: log(p1) - log(p0) is the logit of p1
        p1 = g.probabilities(rows)[:, 1]
        moderate = (p1 > P_MODERATE[0]) & (p1 < P_MODERATE[1])
        logit = np.log(p1 / (1 - p1))
        assert moderate.all() and np.abs(np.array(values) - logit)[moderate].max() < 1e-4

    scale = max(1.0, float(np.abs(contributions).max()))
    diffs = {"exact": float(np.abs(shap_exact(g, baseline, rows) - contributions).max())}
    assert diffs["exact"] < SHAP_EXACT_TOL * scale, diffs
    if is_tree:
        diffs["tree"] = float(np.abs(shap_tree(native, baseline, rows) - contributions).max())
        assert diffs["tree"] < SHAP_TREE_TOL * scale, diffs

    note = (
        f"value = g(row) = log(p1) - log(p0) from the model's {g.output} output (onnxruntime "
        f"{ort.__version__}, CPUExecutionProvider, float32 input scored in batches of at least "
        f"{MIN_BATCH} rows, probabilities as float64); base_value = g(baseline). contributions: "
        "exact Shapley values of v(S) = g(row with the features outside S set to the baseline), "
        "by brute force over all 2^k coalitions of the k features where the row differs from the "
        "baseline (listed in differing; a missing value differs); every other feature gets "
        "exactly 0. Sum of contributions = value - base_value within 1e-9. shap_max_abs_diff: "
        f"largest absolute difference from shap {shap.__version__}'s exact explainer on the same "
        "ONNX model with the baseline as the one background row (exact)"
        + (", and from its interventional tree explainer on the native model (tree)"
           if is_tree else "")
        + ". Rows are float32 values; a missing value (NaN) is written as null."
    )
    doc = {"model": name, "version": VERSION, "output": g.output, "class": 1, "space": "logit",
           "note": note, "feature_names": features,
           "baseline": [float(v) for v in baseline],
           "rows": [json_row(z) for z in rows],
           "differing": differing,
           "value": values, "base_value": base_value,
           "contributions": [[float(v) for v in phi] for phi in contributions],
           "shap_max_abs_diff": diffs}
    out = EXPLAIN / "expected" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(bm.to_json(doc) + "\n")
    return g.output, rows, differing, contributions, diffs


def main():
    X_df, y, features = bm.load_features()
    X_train_df, X_held_df, y_train, y_held = train_test_split(
        X_df, y, test_size=bm.HELD_OUT, stratify=y, random_state=bm.SEED
    )
    X_train = X_train_df.to_numpy(np.float32)
    X_held = X_held_df.to_numpy(np.float32)
    n = len(features)
    rng = np.random.default_rng(bm.SEED)
    X_train_missing = with_missing(X_train, features, rng)
    X_held_missing = with_missing(X_held, features, rng)  # only to check the ONNX models

    linear = bm.logistic(1.0).fit(X_train, y_train)
    hgb = HistGradientBoostingClassifier(max_iter=40, max_depth=4, random_state=bm.SEED)
    hgb.fit(X_train_missing, y_train)
    lgbm = lightgbm.LGBMClassifier(n_estimators=40, num_leaves=15, random_state=bm.SEED,
                                   deterministic=True, force_col_wise=True, n_jobs=1, verbose=-1)
    lgbm.fit(X_train_missing, y_train)
    # Strong L2 keeps the probabilities away from 0 and 1 (as build_models' mlp fixture).
    mlp = Pipeline([("scale", StandardScaler()),
                    ("clf", MLPClassifier(hidden_layer_sizes=(32, 16), alpha=10.0, max_iter=300,
                                          random_state=bm.SEED))])
    mlp.fit(X_train, y_train)

    models = EXPLAIN / "models"
    # (name, description, fitted model, export, training rows, tree model, logistic output)
    specs = [
        ("linear", "Explanation fixture: standardised logistic regression, C=1.0 (skl2onnx)",
         linear, lambda p: bm.export(linear, n, p, zipmap=False), X_train, False, True),
        ("linear_standard",
         "Explanation fixture: the linear fixture's model written with standard ONNX operators",
         linear, lambda p: bm.export_standard_logistic(linear, n, p), X_train, False, True),
        ("gbt_sklearn",
         "Explanation fixture: HistGradientBoostingClassifier, 40 trees of depth 4, trained with "
         "missing values (skl2onnx)",
         hgb, lambda p: bm.export(hgb, n, p, zipmap=False), X_train_missing, True, True),
        ("gbt_lightgbm",
         "Explanation fixture: LightGBM, 40 trees of 15 leaves, trained with missing values "
         "(onnxmltools)",
         lgbm, lambda p: export_lightgbm(lgbm, n, p), X_train_missing, True, True),
        ("mlp", "Explanation fixture: multi-layer perceptron (32, 16), alpha=10",
         mlp, lambda p: bm.export(mlp, n, p, zipmap=False), X_train, False, False),
    ]
    summary = []
    for name, description, native, export, X_fit, is_tree, is_logistic in specs:
        path = models / name / str(VERSION) / "model.onnx"
        with skl2onnx_missing_tracks_as_ints():
            export(path)
        graph = describe_graph(path)
        if is_tree:
            assert graph["tree_op"] == "TreeEnsembleClassifier", graph
            assert graph["post_transform"] == "LOGISTIC", graph
        g = LogOdds(path)
        native_diff = check_against_native(native, g, X_held, X_held_missing, is_tree)
        bm.write_config(models / name, description, features, PLAIN, explain=g.output)
        baseline = bm.write_baseline(models / name, X_fit)
        output, rows, differing, contributions, diffs = explain_model(
            name, path, native, baseline, X_held, features, is_tree, is_logistic)
        if native is linear:
            graph["linear_diff"] = check_linear(linear, rows, baseline, contributions)
        summary.append((name, path, graph, output, native_diff, rows, differing, contributions,
                        diffs))

    for name, path, graph, output, native_diff, rows, differing, contributions, diffs in summary:
        print(f"{name}: output {output}, {path.stat().st_size / 1024:.0f} kB, "
              f"ops {' '.join(graph['ops'])}, opsets {graph['opsets']}, "
              f"IR {graph['ir_version']}")
        if "tree_op" in graph:
            print(f"  {graph['tree_op']}: post_transform {graph['post_transform']}, "
                  f"{graph['n_trees']} trees, missing_value_tracks_true "
                  f"{'has' if graph['missing_tracks_true'] else 'has no'} 1s "
                  f"({graph['missing_tracks_true']} nodes), class_ids {graph['class_ids']}, "
                  f"classlabels {graph['classlabels']}, base_values {graph['base_values']}")
        if "linear_diff" in graph:
            print(f"  max |contribution - w (x - b)| {graph['linear_diff']:.2e}")
        print(f"  max |ONNX - native| probability {native_diff:.2e}; {len(rows)} rows, "
              f"k {[len(d) for d in differing]}, rows with NaN {int(np.isnan(rows).any(1).sum())}, "
              f"max |phi| {np.abs(contributions).max():.4f}, "
              f"zero contributions {int((contributions == 0).sum())} of {contributions.size} "
              f"({int(sum((contributions[i, d] == 0).sum() for i, d in enumerate(differing)))} "
              f"of them differing features), shap max abs diff {diffs}")


if __name__ == "__main__":
    main()
