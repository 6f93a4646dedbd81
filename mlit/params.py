"""Parameter counts of the paper's models beside the paper's own figures (Tables 1, 2, 7, 8)."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn

from .config import ENCODERS, PAPER_PARAMS
from .models import MLiTClassifier, MLiTEncoder, MMLiT


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass(frozen=True)
class ParamRow:
    """One line of the table: a model part, its count and the paper's (None where not given)."""

    model: str
    part: str
    count: int
    paper_millions: float | None

    @property
    def deviation(self) -> float | None:
        """Relative difference to the paper's figure."""
        if self.paper_millions is None:
            return None
        return self.count / (self.paper_millions * 1e6) - 1.0


def parameter_table() -> list[ParamRow]:
    """Encoder alone, with a 10- and a 100-class head, and the MAE decoder, for S, XS, XXS."""
    rows = []
    for name, cfg in ENCODERS.items():
        paper = PAPER_PARAMS[name]
        mae = MMLiT(cfg)
        rows += [
            ParamRow(name, "encoder", count_parameters(MLiTEncoder(cfg)), paper["encoder"]),
            ParamRow(name, "encoder + 10-class head", count_parameters(MLiTClassifier(cfg, 10)), None),
            ParamRow(name, "encoder + 100-class head", count_parameters(MLiTClassifier(cfg, 100)), paper["head100"]),
            ParamRow(name, "MAE decoder", count_parameters(mae) - count_parameters(mae.encoder), PAPER_PARAMS["decoder"]),
        ]
    return rows


def format_table(rows: list[ParamRow]) -> str:
    lines = [f"{'model':<6} {'part':<26} {'params':>10} {'paper':>8} {'diff':>7}"]
    for r in rows:
        paper = f"{r.paper_millions:.2f}M" if r.paper_millions is not None else "-"
        diff = f"{100 * r.deviation:+.1f}%" if r.deviation is not None else "-"
        lines.append(f"{r.model:<6} {r.part:<26} {r.count / 1e6:>9.3f}M {paper:>8} {diff:>7}")
    return "\n".join(lines)
