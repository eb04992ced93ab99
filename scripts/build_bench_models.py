#!/usr/bin/env python3
"""Builds models/credit_default_mlp: the German Credit default model as a multi-layer perceptron
with two hidden layers of 256 units (62 → 256 → 256 → 2, about 82,000 weights), trained on the same
rows as the demo model. Each of its runs costs tens of microseconds per row rather than the
logistic regression's fraction of one, so ONNX Runtime's threads and their spin policy show in
the throughput and latency of the worker serving it (benches/e2e/spin.rs).

Also writes tests/fixtures/expected/credit_default_mlp_v1.json (onnxruntime's outputs for the first
held-out rows), which tests/scoring.rs compares the worker's results with.

    pip install -r scripts/requirements-models.txt
    python3 scripts/build_bench_models.py
"""

import sys
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_models as bm  # noqa: E402

NAME = "credit_default_mlp"
HIDDEN = (256, 256)


def main():
    X_df, y, features = bm.load_features()
    X_train, X_held_df, y_train, y_held = train_test_split(
        X_df, y, test_size=bm.HELD_OUT, stratify=y, random_state=bm.SEED
    )
    X_train = X_train.to_numpy(np.float32)
    X_held = X_held_df.to_numpy(np.float32)
    n = len(features)
    # Strong L2, as the mlp fixture: probabilities away from 0 and 1.
    clf = MLPClassifier(hidden_layer_sizes=HIDDEN, max_iter=300, alpha=10.0, random_state=bm.SEED)
    model = Pipeline([("scale", StandardScaler()), ("clf", clf)])
    model.fit(X_train, y_train)
    repo = bm.ROOT / "models"
    path = repo / NAME / "1" / "model.onnx"
    bm.export(model, n, path, zipmap=False)
    description = ("German Credit default model: multi-layer perceptron (256, 256) on standardised "
                   "one-hot features, for benchmarks of larger models")
    bm.write_config(repo / NAME, description, features, ["label", "probabilities"])
    bm.write_expected(NAME, "1", path, features, X_held)
    held = bm.run_model(path, X_held)
    p_default = np.asarray(held["probabilities"])[:, 1]
    agree = float(np.mean((p_default > 0.5) == y_held))
    write_model_card(repo / NAME, path.stat().st_size, len(y_train), len(y_held), agree)
    print(f"{path}: {path.stat().st_size} bytes, held-out accuracy {agree:.3f}")


def write_model_card(model_dir, size, n_train, n_held, accuracy):
    (model_dir / "README.md").write_text(f"""# {NAME}

The German Credit default model of `models/credit_default` as a multi-layer perceptron:
probability that a loan applicant defaults. It is served beside the demo model so that the
benchmarks can measure a model whose runs cost more than a logistic regression's
(`benches/e2e/spin.rs`); the demo model remains the one to read.

- **Data, features and split**: as `models/credit_default/README.md` ({n_train} training rows,
  {n_held} held out). Same input (`input`, float `[batch, 62]`, features in `config.yaml`) and
  outputs (`label` int64 `[batch]`, `probabilities` float `[batch, 2]`).
- **Model**: scikit-learn `StandardScaler` and `MLPClassifier` with two hidden layers of 256
  ReLU units (62 → 256 → 256 → 2), L2 penalty 10, exported with skl2onnx; {size:,} bytes.
- **Held-out accuracy** at a threshold of 0.5: {accuracy:.3f}.
- **Built by** `scripts/build_bench_models.py` (pinned in `scripts/requirements-models.txt`),
  which also writes `tests/fixtures/expected/{NAME}_v1.json`, the onnxruntime outputs that
  `tests/scoring.rs` compares the worker's results with.
""")


if __name__ == "__main__":
    main()
