"""README's Usage and Checkpoints code blocks run as written (one namespace, in a temporary directory)."""

from __future__ import annotations

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_block(text: str, heading: str) -> str:
    section = text[text.index(heading):]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, f"no python block under {heading!r}"
    return m.group(1)


def test_readme_usage_and_checkpoint_blocks_run(tmp_path, monkeypatch):
    text = README.read_text()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SPARSEOPS_CACHE_DIR", str(tmp_path / "cache"))  # only_if_faster's decisions
    ns: dict = {}
    torch.manual_seed(0)
    exec(compile(_python_block(text, "## Usage"), "README.md:Usage", "exec"), ns)
    # what the block says it builds
    import sparseops

    assert isinstance(ns["rigl"], sparseops.RigL) and isinstance(ns["srigl"], sparseops.SRigL)
    pruned = [m for m in ns["pruner"].model.modules() if isinstance(m, sparseops.SparseLinear)]
    assert len(pruned) == 2 and all(abs(m.sparsity - 0.9) < 0.01 for m in pruned)
    assert type(ns["model"][1]) is sparseops.nn.FewBitReLU  # convert_ ran on the last model
    exec(compile(_python_block(text, "### Checkpoints"), "README.md:Checkpoints", "exec"), ns)
    x = torch.randn(4, 1024)
    with torch.no_grad():
        torch.testing.assert_close(ns["dense"](x), ns["model"](x))
    loaded = torch.load("ckpt.pt", weights_only=True)
    assert set(loaded) == set(ns["model"].state_dict())
