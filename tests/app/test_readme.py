"""The README's example of swapping the MoE layer into a user's block runs as written."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_swap_example_runs():
    blocks = re.findall(r"```python\n(import torch.nn as nn.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert len(blocks) == 1, "the README's swap-in example was not found"
    namespace: dict = {}
    exec(blocks[0], namespace)
    y, aux_loss = namespace["Block"]()(torch.randn(2, 5, 192))
    assert y.shape == (2, 5, 192) and aux_loss.dim() == 0
    aux_loss.backward()
