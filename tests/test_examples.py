"""The end-to-end demo (examples/train_sparse_mlp.py) runs, at a smoke size, for each of its four runs."""

import argparse
import importlib.util
from pathlib import Path

import pytest

import sparseops

_PATH = Path(__file__).resolve().parents[1] / "examples" / "train_sparse_mlp.py"


def _demo():
    spec = importlib.util.spec_from_file_location("train_sparse_mlp", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("kind", ["dense", "rigl", "srigl", "gradual"])
def test_train_sparse_mlp_smoke(kind):
    args = argparse.Namespace(steps=24, width=64, features=32, classes=4, batch=32, train=512, lr=1e-2, threads=1)
    r = _demo().run(kind, args)
    assert r["run"] == kind
    assert 0.0 <= r["accuracy"] <= 1.0 and r["step_ms"] > 0 and r["peak_mib"] > 0
    # the sparse runs end at 90% in their hidden layers (the gradual one reaches it at half the run;
    # SRigL's ablation may leave a few weights of its budget unused)
    assert r["hidden_sparsity"] == pytest.approx(0.0 if kind == "dense" else 0.9, abs=0.01 if kind != "srigl" else 0.02)
    assert (r["updates"] > 0) == (kind != "dense")


def test_synthetic_classification():
    x, y = sparseops.data.synthetic_classification(300, 20, 5, seed=3)
    assert x.shape == (300, 20) and y.shape == (300,)
    assert int(y.min()) >= 0 and int(y.max()) < 5 and len(set(y.tolist())) > 1
    x2, y2 = sparseops.data.synthetic_classification(300, 20, 5, seed=3)
    assert (x == x2).all() and (y == y2).all()
    with pytest.raises(ValueError, match="n_classes"):
        sparseops.data.synthetic_classification(10, 4, 1)
