"""The next GPU minute: which hypothesis explains the dense kernels' illegal memory access (NVIDIA
H200, Triton 3.6.0, bench/RESULTS.md "First GPU run").

    python bench/gpu_faults.py faults.md            # on the GPU machine: 2-3 minutes (--budget)
    python bench/gpu_faults.py faults.md --smoke    # on a CPU: the harness, through the interpreter

The hypothesis (bench/sm90_audit.py): Triton 3.6–3.7 miscompile a wgmma dot with a 16- or 32-wide
dimension beside other tensor-core dots on sm_90; the dense weight-gradient kernel had one (now
summed transposed, on mma.sync). Each experiment runs in a fresh process with a fresh
TRITON_CACHE_DIR (every kernel compiled anew, so the environment variables Triton reads at
compile time apply), under a time limit, and prints every Triton launch before it runs and after
it finishes (``CUDA_LAUNCH_BLOCKING=1``: a fault is reported by the launch that caused it):

    pattern            the pattern alone: one kernel holding x_chunkᵀ p (wgmma 128×16×32, a
                       transposed register tile as its A operand) beside pᵀ p (mma.sync), as the
                       dense weight kernel did before the fix, against torch
    pattern-no-mma-v3  the same with DISABLE_MMA_V3=1 (no wgmma anywhere)
    dense              the dense layer at 144/144/5/2 fp16, N = 300 (training, gate noise given),
                       forced Config(32, 8), forward then backward, against the float64
                       reference: which kernel faults, or the worst per-row error
    dense-no-mma-v3    the same with DISABLE_MMA_V3=1
    dense-stages-1     the same with every launch at num_stages=1 (no software pipelining)
    *-memcheck         dense and pattern under ``compute-sanitizer --tool memcheck`` (line and
                       address; it has reported false positives on wgmma: read it beside the
                       DISABLE_MMA_V3 runs)

Reading: pattern faults or is wrong and pattern-no-mma-v3 passes → the wgmma class is confirmed
on this Triton; dense passing says the fix holds (dense-stages-1 passing where dense fails points
at the pipeliner instead). Without CUDA the experiments that need it print one line saying so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import triton  # the experiments' TRITON_INTERPRET / DISABLE_MMA_V3 are set before their process starts
import triton.language as tl

REPO = Path(__file__).resolve().parents[1]
SHAPE = (144, 144, 5, 2)  # m, d_h, t, k: mLiT-S-sized, the shape the first GPU run failed at
TOKENS = 300
SMOKE_SHAPE, SMOKE_TOKENS = (16, 27, 5, 2), 37


@dataclass
class Experiment:
    name: str
    run: str  # what the child runs: "dense" or "pattern"
    env: dict = field(default_factory=dict)
    num_stages: int | None = None
    memcheck: bool = False
    cuda_only: bool = False  # meaningless without a GPU (the interpreter compiles nothing)
    timeout: float = 60.0


EXPERIMENTS = (  # the most telling first: --budget cuts the last
    Experiment("pattern", "pattern", timeout=30.0),
    Experiment("pattern-no-mma-v3", "pattern", env={"DISABLE_MMA_V3": "1"}, cuda_only=True, timeout=30.0),
    Experiment("dense", "dense"),
    Experiment("dense-no-mma-v3", "dense", env={"DISABLE_MMA_V3": "1"}, cuda_only=True),
    Experiment("dense-stages-1", "dense", num_stages=1, cuda_only=True),
    Experiment("pattern-memcheck", "pattern", memcheck=True, cuda_only=True, timeout=45.0),
    Experiment("dense-memcheck", "dense", memcheck=True, cuda_only=True, timeout=90.0),
)


# ----------------------------------------------------------------------------------------------
# the child: one experiment


@triton.jit
def _pattern_kernel(x_ptr, p_ptr, out_ptr, out2_ptr, rows_per_program, N, W: tl.constexpr, DC: tl.constexpr,
                    ROWS: tl.constexpr):
    """The pattern as one kernel — program s: out[s] = Σ x_chunkᵀ p (W, DC), a wgmma W×DC×ROWS on
    sm_90 with a transposed register A operand, and out2[s] = Σ pᵀ p (DC, DC), an mma.sync beside it."""
    s = tl.program_id(0)
    acc = tl.zeros((W, DC), tl.float32)
    acc2 = tl.zeros((DC, DC), tl.float32)
    cw = tl.arange(0, W)
    cd = tl.arange(0, DC)
    lo = s * rows_per_program
    for r0 in range(lo, tl.minimum(lo + rows_per_program, N), ROWS):
        rows = r0 + tl.arange(0, ROWS)
        ok = rows < N
        x = tl.load(x_ptr + rows[:, None] * W + cw[None, :], mask=ok[:, None], other=0.0)
        p = tl.load(p_ptr + rows[:, None] * DC + cd[None, :], mask=ok[:, None], other=0.0)
        acc = tl.dot(tl.trans(x), p, acc)
        acc2 = tl.dot(tl.trans(p), p, acc2)
    tl.store(out_ptr + s * W * DC + cw[:, None] * DC + cd[None, :], acc)
    tl.store(out2_ptr + s * DC * DC + cd[:, None] * DC + cd[None, :], acc2)


def _trace_launches(num_stages: int | None) -> None:
    """Print each Triton launch before it runs and once it finished (synchronised on CUDA); with
    ``num_stages`` every launch gets that many stages."""
    import torch
    from triton.runtime import interpreter, jit

    for cls in (jit.JITFunction, interpreter.InterpretedFunction):
        original = cls.run

        def run(self, *args, grid, warmup, _original=original, _compiled=cls is jit.JITFunction, **kwargs):
            name = getattr(getattr(self, "fn", None), "__name__", "kernel")
            if num_stages is not None and _compiled:
                kwargs["num_stages"] = num_stages
            print(f"launch {name}", flush=True)
            out = _original(self, *args, grid=grid, warmup=warmup, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            print(f"done {name}", flush=True)
            return out

        cls.run = run


def run_dense(smoke: bool) -> str:
    """The dense layer forward then backward at Config(32, 8) against the float64 reference."""
    import torch

    from mlit_kernels.dense import Config, force_config
    from mlit_kernels.functional import moe_triton
    from mlit_kernels.reference import max_row_error, moe_reference

    device = "cuda" if torch.cuda.is_available() else "cpu"
    m, d_h, t, k = SMOKE_SHAPE if smoke else SHAPE
    n = SMOKE_TOKENS if smoke else TOKENS
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(m, t, generator=g) * 0.5, torch.randn(m, t, generator=g) * 0.5,
              torch.randn(t, m, d_h, generator=g) / m**0.5, torch.randn(t, d_h, generator=g) * 0.1,
              torch.randn(m, d_h, generator=g) / m**0.5, torch.randn(d_h, generator=g) * 0.1,
              torch.randn(d_h, m, generator=g) / d_h**0.5, torch.randn(m, generator=g) * 0.1]
    x = torch.randn(n, m, generator=g)
    noise, dy = torch.randn(n, t, generator=g), torch.randn(n, m, generator=g)
    dtype = torch.float16
    got = [p.to(device, torch.float32 if i < 2 else dtype).requires_grad_() for i, p in enumerate(params)]
    xt = x.to(device, dtype).requires_grad_()
    with force_config(Config(32, 8)):
        y, aux = moe_triton(xt, *got, k, True, noise=noise.to(device), variant="dense", dropout=0.0)
        print("forward finished", flush=True)
        torch.autograd.backward((y, aux), (dy.to(device, dtype), torch.ones((), device=device)))
        print("backward finished", flush=True)
    ref = [p.to(device, torch.float32 if i < 2 else dtype).double().requires_grad_() for i, p in enumerate(params)]
    xr = x.to(device, dtype).double().requires_grad_()
    yr, auxr = moe_reference(xr, *ref, k, True, noise=noise.to(device).double(), dropout=0.0)
    torch.autograd.backward((yr, auxr), (dy.to(device, dtype).double(), torch.ones((), device=device).double()))
    errors = {"y": max_row_error(y, yr), "x": max_row_error(xt.grad, xr.grad)}
    errors.update({f"param{i}": max_row_error(a.grad, b.grad) for i, (a, b) in enumerate(zip(got, ref))
                   if b.grad is not None})
    worst = max(errors, key=errors.get)
    verdict = "PASS" if errors[worst] <= 1e-2 else "WRONG"
    return f"{verdict}: worst per-row error {errors[worst]:.2e} ({worst}; fp16 tolerance 1e-2)"


def run_pattern(smoke: bool) -> str:
    """One kernel holding the miscompile pattern, against torch (fp32 products of fp16 values)."""
    import torch
    import triton

    device = "cuda" if torch.cuda.is_available() else "cpu"
    n, splits, w, dc = (40, 2, 32, 16) if smoke else (TOKENS * 17, 17, 128, 16)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, w, generator=g).to(device, torch.float16)
    p = torch.randn(n, dc, generator=g).to(device, torch.float16)
    per = triton.cdiv(triton.cdiv(n, splits), 32) * 32
    out = torch.empty(splits, w, dc, device=device)
    out2 = torch.empty(splits, dc, dc, device=device)
    _pattern_kernel[(splits,)](x, p, out, out2, per, n, W=w, DC=dc, ROWS=32, num_warps=8)
    if device == "cuda":
        torch.cuda.synchronize()
    want = torch.stack([x[s * per:(s + 1) * per].float().T @ p[s * per:(s + 1) * per].float() for s in range(splits)])
    want2 = torch.stack([p[s * per:(s + 1) * per].float().T @ p[s * per:(s + 1) * per].float() for s in range(splits)])
    err = max(((out - want).abs().max() / want.abs().max()).item(), ((out2 - want2).abs().max() / want2.abs().max()).item())
    return f"{'PASS' if err <= 1e-3 else 'WRONG'}: max relative error {err:.2e} against torch (tolerance 1e-3)"


def child(name: str, run: str, num_stages: int | None, smoke: bool) -> int:
    import torch
    import triton

    print(f"experiment {name}: torch {torch.__version__}, triton {triton.__version__}, "
          f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu (interpreter)'}; "
          + ", ".join(f"{k}={os.environ.get(k, '')}" for k in ("CUDA_LAUNCH_BLOCKING", "DISABLE_MMA_V3",
                                                                  "TRITON_CACHE_DIR")), flush=True)
    _trace_launches(num_stages)
    print("RESULT " + (run_dense(smoke) if run == "dense" else run_pattern(smoke)), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# the driver: every experiment in a fresh process


def _sanitizer() -> str | None:
    found = shutil.which("compute-sanitizer")
    for path in ([found] if found else []) + ["/usr/local/cuda/bin/compute-sanitizer"]:
        if path and os.path.exists(path):
            return path
    return None


def verdict(output: str, code: int | None) -> str:
    """One line from a child's output: its RESULT, or the launch that did not finish."""
    lines = output.splitlines()
    results = [line[len("RESULT "):] for line in lines if line.startswith("RESULT ")]
    if results and code == 0:
        return results[-1]
    started = [line[len("launch "):] for line in lines if line.startswith("launch ")]
    finished = [line[len("done "):] for line in lines if line.startswith("done ")]
    errors = [line.strip() for line in lines if "Error" in line or "error" in line]
    where = f" in {started[-1]} (launch {len(started)}, {len(finished)} finished)" if len(started) > len(finished) else ""
    what = "timed out" if code is None else f"FAILED (exit {code})"
    return f"{what}{where}: {errors[-1][:200] if errors else (lines[-1][:200] if lines else 'no output')}"


def run_all(out: Path, smoke: bool, budget: float, only: list[str] | None = None) -> int:
    import torch

    cuda = torch.cuda.is_available()
    end = time.monotonic() + budget
    rows, logs = [], []
    env0 = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_LAUNCH_BLOCKING="1", MLIT_UNCLEARED_KERNELS="1")
    env0["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env0["PYTHONPATH"]] if env0.get("PYTHONPATH") else []))
    if not cuda:
        env0["TRITON_INTERPRET"] = "1"
    for exp in EXPERIMENTS:
        if only and exp.name not in only:
            continue
        started = time.monotonic()
        settings = ", ".join([f"{k}={v}" for k, v in exp.env.items()]
                             + ([f"num_stages={exp.num_stages}"] if exp.num_stages else [])
                             + (["compute-sanitizer memcheck"] if exp.memcheck else [])) or "-"
        skip = None
        if exp.cuda_only and not cuda:
            skip = "skipped: needs CUDA (the interpreter compiles nothing)"
        elif exp.memcheck and _sanitizer() is None:
            skip = "skipped: compute-sanitizer not found"
        elif end - started < 10:
            skip = "skipped: out of --budget"
        if skip:
            rows.append(f"| {exp.name} | {settings} | {skip} | 0 |")
            print(f"{exp.name}: {skip}", flush=True)
            continue
        with tempfile.TemporaryDirectory(prefix=f"triton-cache-{exp.name}-") as cache:
            env = dict(env0, TRITON_CACHE_DIR=cache, **exp.env)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", exp.name, "--run", exp.run]
            cmd += ["--num-stages", str(exp.num_stages)] if exp.num_stages else []
            cmd += ["--smoke"] if smoke else []
            if exp.memcheck:
                cmd = [_sanitizer(), "--tool", "memcheck", "--print-limit", "20"] + cmd
            limit = min(exp.timeout * (4 if smoke else 1), end - started)
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
                output, code = proc.stdout + proc.stderr, proc.returncode
            except subprocess.TimeoutExpired as exc:
                output = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
                code = None
        seconds = time.monotonic() - started
        line = verdict(output, code)
        rows.append(f"| {exp.name} | {settings} | {line.replace('|', '/')} | {seconds:.0f} |")
        logs += [f"### {exp.name}", "", "```", "\n".join(output.splitlines()[-40:]), "```", ""]
        print(f"{exp.name} ({seconds:.0f} s): {line}", flush=True)
    text = "\n".join(["# Fault experiments (bench/gpu_faults.py)", "",
                      f"{'smoke run on the CPU (interpreter)' if smoke or not cuda else 'GPU'}; shape "
                      f"{'/'.join(map(str, SMOKE_SHAPE if smoke else SHAPE))} fp16, N = {SMOKE_TOKENS if smoke else TOKENS}; "
                      "each experiment a fresh process with a fresh TRITON_CACHE_DIR, CUDA_LAUNCH_BLOCKING=1.", "",
                      "| experiment | settings | result | s |", "| --- | --- | --- | --- |", *rows, "",
                      "## Last lines of each experiment", "", *logs])
    out.write_text(text + "\n")
    print(f"written to {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", default="faults.md", help="markdown file to write")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (the CPU: the harness only)")
    parser.add_argument("--budget", type=float, default=180.0, help="seconds for all experiments (default 180)")
    parser.add_argument("--only", default="", help="comma-separated experiment names")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--run", choices=("dense", "pattern"), help=argparse.SUPPRESS)
    parser.add_argument("--num-stages", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.run, args.num_stages, args.smoke)
    return run_all(Path(args.output), args.smoke, args.budget, [n for n in args.only.split(",") if n] or None)


if __name__ == "__main__":
    sys.exit(main())
