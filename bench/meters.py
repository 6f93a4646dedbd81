"""Launch / sync / byte meters, counted on the CPU: one command prints them all.

    python bench/meters.py                 # the MoE layer table (and the training-step table)
    python bench/meters.py --markdown      # the same as markdown, for bench/RESULTS.md

Layer table: one MoE layer of each model (first and last layer: the widest and the narrowest
shapes) at a classifier batch (N = 256 × 145 tokens), as the mixed-precision training loop runs
it (fp16 autocast, x fp32 from the LayerNorm, fp32 master weights), for the reference and the
Triton backends: kernel launches and host syncs of the training forward + backward and of the eval
forward, modeled HBM traffic against the minimum (inputs read and outputs written once), and the
padding of the widest Triton tile. The Triton kernels are recorded, not run (``dry_run``), so the
counts come in seconds; the reference runs for real (tens of seconds).
Budgets pinned by tests/checks/test_meter.py: Triton training fwd + bwd ≤ 8 launches, eval forward ≤ 2,
0 syncs, bytes ≤ 3 × the minimum, padding no more than rounding each width up to 16.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton launches are recorded on the CPU
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from mlit.config import ENCODERS  # noqa: E402
from mlit_kernels import SharedSwiGLUMoE  # noqa: E402
from mlit_kernels.meter import measure_layer  # noqa: E402

TOKENS = 256 * 145


def layer_shapes() -> list[tuple[str, int, int, int]]:
    """(label, m, d_h, t) of the first and last MoE layer of each encoder preset."""
    shapes = []
    for name, cfg in ENCODERS.items():
        for i in (0, cfg.depth - 1):
            shapes.append((f"{name} layer {i}", cfg.embed_dim, cfg.hidden_dim(i), cfg.num_experts(i)))
    return shapes


def layer_rows(tokens: int = TOKENS, backends=("reference", "triton")) -> list[dict]:
    rows = []
    for label, m, d_h, t in layer_shapes():
        for backend in backends:
            torch.manual_seed(0)
            layer = SharedSwiGLUMoE(m, d_h, t, k=2, backend=backend)
            costs = measure_layer(layer, tokens)
            rows.append(dict(layer=label, shape=f"{m}/{d_h}/{t}", backend=backend, costs=costs))
    return rows


def layer_table(rows: list[dict], markdown: bool = False) -> str:
    head = ["layer", "m/d_h/t", "backend", "train launches", "syncs", "train MB", "× min", "eval launches",
            "eval MB", "× min", "pad m", "pad d_h"]
    lines = []
    for r in rows:
        c = r["costs"]
        lines.append([r["layer"], r["shape"], r["backend"], str(c.launches), str(c.syncs + c.syncs_eval),
                      f"{c.bytes / 1e6:.1f}", f"{c.bytes / c.min_bytes:.2f}", str(c.launches_eval),
                      f"{c.bytes_eval / 1e6:.1f}", f"{c.bytes_eval / c.min_bytes_eval:.2f}", f"{c.padding_m:.1%}",
                      f"{c.padding_d_h:.1%}"])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
                         + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [head] + lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=TOKENS, help=f"tokens per layer call (default {TOKENS})")
    parser.add_argument("--backends", default="reference,triton", help="comma-separated: reference, triton")
    parser.add_argument("--no-steps", action="store_true", help="only the layer table")
    parser.add_argument("--markdown", action="store_true", help="print markdown tables")
    args = parser.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    print(f"MoE layer, N = {args.tokens} tokens, fp16 autocast (train = forward + backward; eval = forward)\n")
    print(layer_table(layer_rows(args.tokens, tuple(args.backends.split(","))), args.markdown), flush=True)
    if not args.no_steps:
        try:
            from step_meters import step_table
        except ImportError:
            return 0
        print("\nTraining step\n")
        print(step_table(markdown=args.markdown))
    return 0


if __name__ == "__main__":
    sys.exit(main())
