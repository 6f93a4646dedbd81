"""Dense vs dispatch: where the automatic choice (``variants.DENSE_AUTO_MAX``) should switch.

    python bench/crossover.py [--tokens N] [--markdown]

For each shape and expert count t (k = 2), one training forward + backward of the layer under
fp16 autocast, counted on the CPU with the meters (Triton launches recorded, not run): launches,
modeled HBM bytes, and a modeled H100 time = bytes / 3.35 TB/s + FLOPs / 989 TFLOP/s + 1.3 µs a
launch. FLOPs are modeled from each variant's design, in units of one token's x·W (2·m·d_h):

* dense (:mod:`mlit_kernels.dense`): a 32-token tile computes every expert any of its tokens
  picked (ē = t·(1 − (1 − k/t)^32) for uniform routing) plus V and W_2: forward ē + 2; backward
  2ē + 3 (tokens kernel) + t + 2 (weights kernel: each W_e sums over every token, masked);
* dispatch (:mod:`mlit_kernels.dispatch`): per pair W1, V, W2 forward (3k); backward 5k (W1, V
  recomputed, dh, dx through W1 and V) + 6k (dW1, dV, dW2, and W1, V, dh recomputed once more:
  every m here fits one column group of the weight-gradient strips).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlit_kernels import SharedSwiGLUMoE  # noqa: E402
from mlit_kernels.meter import measure_layer  # noqa: E402

BANDWIDTH, FLOP_RATE, LAUNCH_S = 3.35e12, 989e12, 1.3e-6
SHAPES = [(144, 144), (192, 768)]  # (m, d_h): mLiT-S layer 0; a ViT-Ti-like MLP
EXPERTS = (4, 8, 12, 16)
TILE = 32


def model_flops(variant: str, n: int, m: int, d_h: int, t: int, k: int) -> float:
    unit = 2.0 * n * m * d_h
    if variant == "dense":
        routed = t * (1 - (1 - k / t) ** TILE)
        return unit * ((routed + 2) + (2 * routed + 3) + (t + 2))
    return unit * (3 * k + 11 * k)


def rows(tokens: int, k: int = 2) -> list[dict]:
    out = []
    for m, d_h in SHAPES:
        for t in EXPERTS:
            for variant in ("dense", "dispatch"):
                layer = SharedSwiGLUMoE(m, d_h, t, k=k, backend="triton", triton_variant=variant)
                costs = measure_layer(layer, tokens)
                flops = model_flops(variant, tokens, m, d_h, t, k)
                seconds = costs.bytes / BANDWIDTH + flops / FLOP_RATE + costs.launches * LAUNCH_S
                out.append(dict(shape=f"{m}/{d_h}", t=t, variant=variant, launches=costs.launches,
                                mb=costs.bytes / 1e6, ratio=costs.bytes / costs.min_bytes, gflop=flops / 1e9,
                                us=seconds * 1e6))
    return out


def table(found: list[dict], markdown: bool) -> str:
    head = ["m/d_h", "t", "variant", "launches", "MB", "x min", "GFLOP", "model µs"]
    lines = [[r["shape"], str(r["t"]), r["variant"], str(r["launches"]), f"{r['mb']:.1f}", f"{r['ratio']:.2f}",
              f"{r['gflop']:.1f}", f"{r['us']:.1f}"] for r in found]
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
                         + ["| " + " | ".join(line) + " |" for line in lines])
    return "\n".join(" ".join(f"{c:>9}" for c in line) for line in [head] + lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=256 * 145)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    print(f"training forward + backward, N = {args.tokens}, k = 2, fp16 autocast\n")
    print(table(rows(args.tokens), args.markdown))


if __name__ == "__main__":
    main()
