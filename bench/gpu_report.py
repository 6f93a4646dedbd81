"""GPU report for the Triton MoE backend: correctness on the device, timings, roofline.

    python bench/gpu_report.py report.md            # on a CUDA machine
    python bench/gpu_report.py --smoke smoke.md     # anywhere: tiny shapes, Triton interpreter on CPU

(What the kernels compile to for sm_90 without a GPU — dots, registers, spills, shared memory at
the launched settings — is bench/sm90_audit.py's.)

1. Checks every kernel family of :mod:`mlit_kernels.registry` against its float64 reference on
   the device, each in a child process (:func:`mlit_kernels.checks.clear`, nothing recorded): at
   each family's GPU shapes (its small shapes with ``--smoke``) in fp32, fp16 and bf16, the worst
   per-row relative error (:func:`mlit_kernels.reference.max_row_error`) of every output and
   gradient against the per-dtype tolerance (:mod:`mlit_kernels.common.precision`).
2. Times (triton.testing.do_bench: CUDA events, median, after warm-up; fresh random non-zero
   inputs) the layer in training mode under fp16 autocast — reference eager,
   torch.compile(reference), Triton dispatch, Triton dense — forward and forward + backward, at
   the paper's shapes (mLiT-S layer 0: m = d_h = 144, t = 3; mLiT-XXS last layer: m = 108,
   d_h = 27, t = 5; k = 2; N = 256 × 145 and 1280 × 37), and at issue 17's many-expert shapes
   (16 experts of 192/768 and 64 of 384/1536, k = 2, N = 256 × 145; the dense variant at t = 16).
3. Measures the device's fp16 matmul rate and copy bandwidth, computes the roofline floor
   max(FLOPs / matmul rate, minimal bytes / bandwidth) per case and the fraction reached.
4. Prints a markdown table (device, date, versions) and writes it to the path given.

FLOPs counted: gate 2 GEMMs (2·2·N·m·t), experts 2·N·m·d_h·(k + 2); forward + backward = 3 ×
forward. Minimal bytes (fp16 activations, weights read once): forward reads x and writes y
(2·N·m·2 B); forward + backward also reads dy and x again and writes dx (5·N·m·2 B).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

SMOKE = "--smoke" in sys.argv
if SMOKE and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402

from mlit_kernels import SharedSwiGLUMoE, registry  # noqa: E402
from mlit_kernels.checks import clear, verdict_row  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def shapes(smoke):
    if smoke:
        return [("tiny-a", 16, 27, 5, 2, [37]), ("tiny-b", 16, 32, 3, 2, [45])]
    return [("S-layer0", 144, 144, 3, 2, [256 * 145, 1280 * 37]), ("XXS-last", 108, 27, 5, 2, [256 * 145, 1280 * 37])]


def many_expert_shapes(smoke):
    """Issue 17's many-expert layers (name, m, d_h, t, k, token counts, Triton variants timed):
    the dense variant too at t = 16, where the byte/FLOP model puts it behind dispatch."""
    if smoke:
        return [("tiny-many", 16, 32, 8, 2, [45], ("dispatch", "dense"))]
    return [("16x192/768", 192, 768, 16, 2, [256 * 145], ("dispatch", "dense")),
            ("64x384/1536", 384, 1536, 64, 2, [256 * 145], ("dispatch",))]


def bench(fn, smoke):
    """Median milliseconds: CUDA events via do_bench on a GPU, perf_counter otherwise."""
    if CUDA:
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(2 if smoke else 5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def device_rates(smoke):
    """(fp16 matmul FLOP/s, copy bytes/s) of this device."""
    size = 256 if smoke else 8192
    a = torch.randn(size, size, device=DEVICE, dtype=torch.float16 if CUDA else torch.float32)
    b = torch.randn_like(a)
    ms = bench(lambda: a @ b, smoke)
    flops = 2 * size**3 / (ms * 1e-3)
    numel = (1 << 20) if smoke else (1 << 29)  # 1 GiB of fp16
    src = torch.empty(numel, device=DEVICE, dtype=torch.float16)
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src), smoke)
    bandwidth = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    return flops, bandwidth


def make_layer(m, d_h, t, k, backend, shared=("v", "w2")):
    torch.manual_seed(0)
    layer = SharedSwiGLUMoE(m, d_h, t, k=k, shared=shared).to(DEVICE)
    with torch.no_grad():
        layer.w_gate.normal_(0, m**-0.5)
        layer.w_noise.normal_(0, m**-0.5)
    if backend.startswith("triton"):
        layer.backend = "triton"
        layer.triton_variant = backend.split("-")[1]
    layer.train()
    return torch.compile(layer) if backend == "compile" else layer


def time_layer(layer, m, n, mode, smoke):
    xs = [torch.randn(n, m, device=DEVICE, requires_grad=(mode == "fwd+bwd")) for _ in range(4)]
    state = {"i": 0}

    def step():
        x = xs[state["i"] % len(xs)]  # fresh inputs, rotated
        state["i"] += 1
        with torch.autocast(DEVICE, dtype=torch.float16, enabled=CUDA):
            y, aux = layer(x)
        if mode == "fwd+bwd":
            (y.float().square().mean() + aux).backward()

    if mode == "fwd":
        with torch.no_grad():
            return bench(step, smoke)
    return bench(step, smoke)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", default="gpu_report.md", help="markdown file to write")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU through the interpreter")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    args = parser.parse_args()
    if not CUDA and not args.smoke:
        parser.error("no CUDA device: run with --smoke (tiny shapes through the Triton interpreter)")
    smoke = args.smoke
    lines = [
        "# mlit_kernels GPU report",
        "",
        f"- device: {torch.cuda.get_device_name() if CUDA else 'cpu (Triton interpreter, smoke run)'}",
        f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- torch {torch.__version__}, triton {triton.__version__}",
        "",
        "## Correctness: every kernel family against its float64 reference (a child process each)",
        "",
        "| family | shapes | dtypes | verdict | worst error / limit | s |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(lines), flush=True)
    failures = 0
    for verdict in clear(registry.families(), {}, DEVICE, dtypes=(torch.float32, torch.float16, torch.bfloat16),
                         record=False, precompile=True):
        worst = verdict_row(verdict)["worst"]
        failures += not verdict.cleared
        row = (f"| {verdict.family} | {len(verdict.checked)} | {'/'.join(verdict.checked[0]['dtypes'])} | "
               f"{'ok' if verdict.cleared else 'FAIL: ' + verdict.cause + ': ' + verdict.detail[:120]} | "
               + (f"{worst['error']:.2e} / {worst['limit']:.1e} ({worst['what']})" if worst else "") +
               f" | {verdict.seconds:.0f} |")
        lines.append(row)
        print(row, flush=True)
    flops_rate, bandwidth = device_rates(smoke)
    lines += ["", f"Device rates: {'fp16' if CUDA else 'fp32'} matmul {flops_rate / 1e12:.3f} TFLOP/s, "
              f"copy {bandwidth / 1e9:.1f} GB/s.", "",
              "## Timings (training mode, fp16 autocast; median ms)", "",
              "| shape | N | pass | backend | ms | floor ms | fraction of floor |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    print("\n".join(lines[-6:]), flush=True)
    compiled = [] if args.no_compile or smoke else ["compile"]
    cases = [(*shape, ("dispatch", "dense")) for shape in shapes(smoke)] + many_expert_shapes(smoke)
    for name, m, d_h, t, k, token_counts, variants in cases:
        backends = ["reference"] + compiled + [f"triton-{variant}" for variant in variants]
        for n in token_counts:
            fwd_flops = 2 * 2 * n * m * t + 2 * n * m * d_h * (k + 2)
            for mode in ("fwd", "fwd+bwd"):
                flops = fwd_flops * (1 if mode == "fwd" else 3)
                nbytes = (2 if mode == "fwd" else 5) * n * m * 2
                floor_ms = max(flops / flops_rate, nbytes / bandwidth) * 1e3
                for backend in backends:
                    layer = make_layer(m, d_h, t, k, backend)
                    ms = time_layer(layer, m, n, mode, smoke)
                    row = f"| {name} | {n} | {mode} | {backend} | {ms:.3f} | {floor_ms:.4f} | {floor_ms / ms:.1%} |"
                    lines.append(row)
                    print(row, flush=True)
    text = "\n".join(lines) + "\n"
    with open(args.output, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"\nwritten to {args.output}; {failures} correctness failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
