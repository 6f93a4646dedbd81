"""Peers measured, not read: the MoE layer and the rest of the training step against ScatterMoE,
Liger-Kernel, vLLM's fused_moe kernel, torch.compile and eager torch, under this project's meters.

    python bench/peers.py --fetch [--scattermoe-git DIR]   # the peers at their pinned versions
    python bench/peers.py [--markdown] [--parts moe,step]  # every table, from one run
    python bench/peers.py --smoke                          # tiny shapes, seconds (tests/app/test_peers.py)

``--fetch`` puts the peers' code where this script loads it, never in the repository: ScatterMoE's
source at :data:`SCATTERMOE_COMMIT` into the git-ignored ``.peers/scattermoe`` (``git archive`` of
a clone, or of the git directory ``--scattermoe-git`` names: ScatterMoE is not on PyPI), one file
of the vLLM wheel (:data:`VLLM_VERSION`, the Triton kernel ``fused_moe_kernel`` and its default
tile rule, sha256-checked) into ``.peers/vllm``, and the liger-kernel wheel (:data:`LIGER_VERSION`,
pure Python) unpacked into ``.peers/liger`` (an installed liger-kernel is used where that is
absent). ``.peers/`` is what a GPU machine without network needs (carry it). A peer that cannot be
had is skipped with one line saying why; each row names its peer's version.

A case is one layer at one shape, "fwd" (an inference forward, no autograd) or "train" (forward +
backward). Every row of a case gets the same inputs (the same x, gate and expert weights, dy) and
is compared with the float64 reference of what the row computes; where a peer computes other math
than the case's layer (no gate noise, no shared V / W2, no balancing loss, no biases) the row's
note says what it computes, and its reference is that math on the same inputs. Columns:

* ``check``: the worst per-row error (:func:`mlit_kernels.reference.max_row_error`) over the
  outputs and every gradient, at ``--check-tokens`` tokens in the check dtype (CPU: fp32 through
  Triton's interpreter, 100 tokens, the many-expert shapes at m / d_h = 64 / 128 with their t and
  k, said under the table; CUDA: fp16, 4133 tokens), against :data:`mlit_kernels.selfcheck.TOL`;
  "FAIL" above it, "error" where the row cannot run (the reason under the table);
* ``launches``, ``syncs``, ``MB``: :class:`mlit_kernels.meter.Meter` at the case's full size in
  fp16 (dry run: Triton launches, any project's, recorded and not run; torch ops run), the peers'
  custom ops opened up like this project's and their matmul kernels' FLOPs modelled
  (:class:`PeerMeter`); ``× min``: bytes over the case's minimum — as ``meter.measure_layer``
  defines it: read x and the case layer's weights, write y; in training also read dy, x and the
  weights, write dx and the weight gradients — one minimum for every row of a case;
* ``H100 µs graph`` / ``eager``: the meter's roofline (``meter.H100``: per launch max(launch,
  bytes / 3.35 TB/s, FLOPs / 989 TFLOP/s), 1.3 µs a launch in a CUDA graph, 4 µs eager); "-" in
  the graph column where a host sync bars capture;
* ``GPU µs``, ``× best peer``: on CUDA only, the median of CUDA-event times of the step after
  warm-up, and its ratio to the fastest row that is not this project's; "-" without a GPU.

torch.compile rows are checked (on the CPU only with ``--compile-cpu``: compiling takes tens of
seconds a case) and timed, not metered: inductor's kernels launch outside the meter's hooks.
``--no-compile`` and ``--exclude "row;row"`` leave rows out (on a GPU: this project's dense
kernels, until a GPU run clears them).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import hashlib
import importlib
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import types
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: peers' kernels run interpreted
# Liger's fused MoE autotunes by timing candidates: not through the interpreter (one configuration off
# CUDA); on CUDA its tuning happens in the warm-up of the timing, before the dry-run meter could count it.
os.environ.setdefault("LIGER_FUSED_MOE_AUTOTUNE", "0" if not torch.cuda.is_available() else "1")
sys.path.insert(0, str(ROOT))

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

from mlit_kernels.meter import H100, Meter, _kernel_arguments  # noqa: E402
from mlit_kernels.reference import max_row_error, moe_reference  # noqa: E402
from mlit_kernels.common.precision import TOL  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
PEERS_DIR = ROOT / ".peers"

#: ScatterMoE (github shawntan/scattermoe, version 0.3.0): the commit measured.
SCATTERMOE_COMMIT = "47b5e1502e5a10e82c8e5945d761b877849871e7"
SCATTERMOE_URL = "https://github.com/shawntan/scattermoe"
#: vLLM: the wheel whose fused_moe.py is loaded (git 4ba787ec9); the file's sha256.
VLLM_VERSION = "0.33.0"
VLLM_FILE = "vllm/model_executor/layers/fused_moe/fused_moe.py"
VLLM_SHA256 = "f37773a8ca2c93171cbf6e2dc6a08855d8e57db7e4aa8d8fcfc78057c26a0010"
#: Liger-Kernel from PyPI (pulls no other torch or triton).
LIGER_VERSION = "0.8.5"


class Unavailable(Exception):
    """A peer that cannot be had here; the message is the one-line reason."""


# ------------------------------------------------------------------------------------------------
# the peers: fetched at pinned versions, loaded from .peers/ or the environment


def fetch(scattermoe_git: str | None = None) -> None:
    """Put every peer where :func:`load` finds it (network: GitHub for ScatterMoE unless
    ``scattermoe_git`` names a local clone or git directory; PyPI for vLLM and Liger-Kernel)."""
    target = PEERS_DIR / "scattermoe"
    with tempfile.TemporaryDirectory() as tmp:
        git_dir = scattermoe_git
        if git_dir is None:
            subprocess.run(["git", "clone", "--quiet", SCATTERMOE_URL, f"{tmp}/scattermoe"], check=True)
            git_dir = f"{tmp}/scattermoe"
        archive = subprocess.run(["git", f"--git-dir={_git_dir(git_dir)}", "archive", SCATTERMOE_COMMIT],
                                 check=True, capture_output=True).stdout
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
        (target / "COMMIT").write_text(SCATTERMOE_COMMIT + "\n")
        print(f"ScatterMoE {SCATTERMOE_COMMIT[:7]} -> {target}")

        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", f"vllm=={VLLM_VERSION}",
                        "-d", tmp], check=True)
        wheel = next(Path(tmp).glob(f"vllm-{VLLM_VERSION}-*.whl"))
        source = zipfile.ZipFile(wheel).read(VLLM_FILE)
        if hashlib.sha256(source).hexdigest() != VLLM_SHA256:
            raise SystemExit(f"{wheel.name}: {VLLM_FILE} is not the file measured (sha256 differs)")
        (PEERS_DIR / "vllm").mkdir(parents=True, exist_ok=True)
        (PEERS_DIR / "vllm" / "fused_moe.py").write_bytes(source)
        print(f"vLLM {VLLM_VERSION} {VLLM_FILE} -> {PEERS_DIR / 'vllm' / 'fused_moe.py'}")

        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        f"liger-kernel=={LIGER_VERSION}", "-d", tmp], check=True)
        shutil.rmtree(PEERS_DIR / "liger", ignore_errors=True)
        zipfile.ZipFile(next(Path(tmp).glob("liger_kernel-*.whl"))).extractall(PEERS_DIR / "liger")
        print(f"liger-kernel {LIGER_VERSION} (its wheel, unpacked: importable without pip) -> {PEERS_DIR / 'liger'}")


def _shown(path: Path) -> str:
    """A path as the messages give it: relative to the checkout where it lies inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _git_dir(path: str) -> str:
    """The git directory of a clone (``path/.git``) or of a bare repository (``path``)."""
    return str(Path(path) / ".git") if (Path(path) / ".git").exists() else path


_LOADED: dict[str, object] = {}


def load(peer: str):
    """The peer's module ("scattermoe", "liger", "vllm"), or :class:`Unavailable` with the reason."""
    if peer not in _LOADED:
        try:
            _LOADED[peer] = {"scattermoe": _load_scattermoe, "liger": _load_liger, "vllm": _load_vllm}[peer]()
        except Unavailable as why:
            _LOADED[peer] = why
    if isinstance(_LOADED[peer], Unavailable):
        raise _LOADED[peer]
    return _LOADED[peer]


def _load_scattermoe():
    root = PEERS_DIR / "scattermoe"
    if not (root / "scattermoe" / "parallel_experts.py").exists():
        raise Unavailable(f"ScatterMoE not in {_shown(root)} (python bench/peers.py --fetch; not on PyPI)")
    commit = (root / "COMMIT").read_text().strip() if (root / "COMMIT").exists() else "unknown commit"
    if commit != SCATTERMOE_COMMIT:
        raise Unavailable(f"ScatterMoE in .peers/ is {commit[:7]}, not the pinned {SCATTERMOE_COMMIT[:7]} (--fetch)")
    sys.path.insert(0, str(root))
    try:
        module = importlib.import_module("scattermoe")
    except Exception as err:  # noqa: BLE001 - any import failure is a reason to skip the peer
        raise Unavailable(f"ScatterMoE {commit[:7]} does not import: {type(err).__name__}: {err}") from err
    module.version = f"scattermoe {commit[:7]}"
    return module


def _load_liger():
    """Liger-Kernel from .peers/liger (what --fetch unpacks; it travels with the checkout to a
    machine without PyPI), else as installed."""
    if (PEERS_DIR / "liger" / "liger_kernel").exists() and str(PEERS_DIR / "liger") not in sys.path:
        sys.path.insert(0, str(PEERS_DIR / "liger"))
    try:
        from importlib.metadata import version

        import liger_kernel.ops as ops
    except Exception as err:  # noqa: BLE001
        raise Unavailable(f"Liger-Kernel neither in .peers/liger nor installed (python bench/peers.py --fetch, or pip "
                          f"install liger-kernel=={LIGER_VERSION}): {err}") from err
    ops.version = f"liger-kernel {version('liger-kernel')}"
    return ops


def _load_vllm():
    """vLLM's ``fused_moe_kernel`` (and the helper it calls) and ``get_default_config``, taken out of
    its fused_moe.py by their syntax trees and run beside stand-ins for the vLLM settings they read
    (not vLLM's package: its routing, activation and sum are CUDA ops of ``vllm._C``)."""
    path = PEERS_DIR / "vllm" / "fused_moe.py"
    if not path.exists():
        raise Unavailable(f"vLLM's fused_moe.py not in {_shown(path.parent)} (python bench/peers.py --fetch)")
    source = path.read_bytes()
    if hashlib.sha256(source).hexdigest() != VLLM_SHA256:
        raise Unavailable(f"{_shown(path)} is not vLLM {VLLM_VERSION}'s file (sha256 differs; --fetch)")
    import triton
    import triton.language as tl

    wanted = {"write_zeros_to_output", "fused_moe_kernel", "get_default_config"}
    tree = ast.parse(source)
    tree.body = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name in wanted]
    module = types.ModuleType("vllm_fused_moe_peer")
    module.__dict__.update(triton=triton, tl=tl, torch=torch, Any=object, next_power_of_2=triton.next_power_of_2,
                           envs=types.SimpleNamespace(VLLM_BATCH_INVARIANT=False),
                           current_platform=types.SimpleNamespace(is_rocm=lambda: False))
    try:
        exec(compile(tree, str(path), "exec"), module.__dict__)  # noqa: S102 - the pinned, hash-checked file
    except Exception as err:  # noqa: BLE001
        raise Unavailable(f"vLLM {VLLM_VERSION}'s fused_moe_kernel does not load standalone: {err}") from err
    module.version = f"vllm {VLLM_VERSION}"
    return module


@functools.lru_cache(maxsize=None)
def mlit_version() -> str:
    """"mlit <commit>" of this checkout, read once (a commit made while the script runs does not show)."""
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "checkout"
    return f"mlit {commit}"


# ------------------------------------------------------------------------------------------------
# the meter, opened up for the peers


def _pairs(a: dict) -> int:
    """Liger fused MoE: (token, expert) pairs, from whichever per-pair buffer the kernel takes."""
    for name in ("x_gather_idx_ptr", "pre_act_ptr", "post_act_ptr", "d_pre_act_ptr", "weighted_act_ptr"):
        if name in a:
            return a[name].shape[0]
    raise KeyError("no per-pair buffer")


#: Matmul FLOPs of the peers' Triton kernels, from their arguments (2 per multiply-add; useful work).
PEER_FLOPS: dict[str, Callable[[dict], int]] = {
    "_scatter2scatter": lambda a: 2 * a["M"] * a["FAN_OUT"] * a["K"] * a["N"],
    "_groupXtY": lambda a: 2 * a["M"] * a["N"] * a["K"],
    "fused_moe_kernel": lambda a: 2 * a["num_valid_tokens"] * a["N"] * a["K"],
    "_fused_up_proj_swiglu_kernel": lambda a: 4 * _pairs(a) * a["H_dim"] * a["I_dim"],
    "_fused_down_proj_kernel": lambda a: 2 * _pairs(a) * a["H_dim"] * a["I_dim"],
    "_moe_bwd_down_proj_kernel": lambda a: 2 * _pairs(a) * a["H_dim"] * a["I_dim"],
    "_moe_bwd_dW2_kernel": lambda a: 2 * _pairs(a) * a["H_dim"] * a["I_dim"],
    "_moe_bwd_dX_expanded_kernel": lambda a: 4 * _pairs(a) * a["H_dim"] * a["I_dim"],
    "_moe_bwd_dW1_kernel": lambda a: 4 * _pairs(a) * a["H_dim"] * a["I_dim"],
}
#: Peer kernels that run even in a dry run: they produce what the host reads to size buffers
#: (Liger's fused MoE reads its M-tile count, written by the prefix sum over the histogram, with one .item()).
RUN_ALWAYS = {"_moe_router_histogram_kernel", "_moe_router_prefix_sum_kernel"}
#: Custom-op namespaces whose insides are metered (the meter opens up this project's "mlit" ops).
OPEN_NAMESPACES = {"scattermoe"}


class PeerMeter(Meter):
    """:class:`mlit_kernels.meter.Meter` (which wraps every Triton JITFunction's launch, a peer's
    too) with: the custom ops of :data:`OPEN_NAMESPACES` run under the meter (their kernels and
    torch ops counted, not the op as one launch); :data:`PEER_FLOPS` for the peers' matmul
    kernels; :data:`RUN_ALWAYS` kernels run in a dry run."""

    def __init__(self, dry_run: bool = True):
        super().__init__(dry_run=dry_run)
        self._dry = dry_run

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        if not self._in_triton and func.namespace in OPEN_NAMESPACES:
            from torch._library.custom_ops import _maybe_get_opdef

            opdef = _maybe_get_opdef(func)
            if opdef is not None:
                with self:
                    return opdef._init_fn(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types_, args, kwargs)

    def _record_triton(self, fn, args, grid, kwargs) -> None:
        super()._record_triton(fn, args, grid, kwargs)
        record = self.records[-1]
        name = record.name.removeprefix("triton.")
        if name in PEER_FLOPS:
            record.flops = int(PEER_FLOPS[name](_kernel_arguments(fn, args, kwargs)))
        self.dry_run = self._dry and name not in RUN_ALWAYS  # read by the launch wrapper right after this


# ------------------------------------------------------------------------------------------------
# cases and rows


@dataclass
class Prepared:
    """A row ready to run: ``run()`` the step's forward → its outputs; ``leaves`` the tensors
    gradients are taken of (the row's own layout); ``grads()`` those gradients under the case's
    names (the row's layout mapped back)."""

    run: Callable[[], tuple]
    leaves: list[Tensor]
    grads: Callable[[], dict[str, Tensor]]


@dataclass
class Row:
    """One implementation in a case: ``prepare(inputs)`` → :class:`Prepared`; ``reference(inputs
    in float64)`` → the outputs of what the row computes (differentiable); ``notes``: what the row
    computes where it is not the case's layer (empty: it is)."""

    name: str
    version: str
    prepare: Callable[[dict], Prepared]
    reference: Callable[[dict], tuple]
    notes: tuple[str, ...] = ()
    ours: bool = False
    compiled: bool = False
    skip: str | None = None  # why the row cannot run (a peer not had, a mode it lacks)


@dataclass
class Case:
    """A layer at a shape: ``make_inputs(n, dtype, explicit_noise)`` → the inputs in the case's
    layout (activations, weights, ``dy``: the first output's cotangent); ``acts`` / ``weights``:
    the names the minimum bytes count (``grad_acts``: the differentiable activations); checked at
    ``n_check`` tokens, metered and timed at ``n_meter``."""

    part: str
    name: str
    mode: str  # "fwd" or "train"
    n_check: int
    n_meter: int
    make_inputs: Callable[..., dict]
    acts: tuple[str, ...]
    grad_acts: tuple[str, ...]
    weights: tuple[str, ...]
    rows: list[Row] = field(default_factory=list)
    check_inputs: Callable[..., dict] | None = None  # a smaller shape for the check (say so: ``check_shape``)
    check_shape: str | None = None
    meter_skip: Callable[[Row], str | None] = lambda row: None  # why a row is not metered at n_meter here


@dataclass
class Result:
    row: Row
    check: str = "-"
    launches: str = "-"
    syncs: str = "-"
    mb: str = "-"
    x_min: str = "-"
    graph_us: str = "-"
    eager_us: str = "-"
    gpu_us: float | None = None
    ratio: str = "-"
    errors: dict = field(default_factory=dict)
    skipped: str | None = None


def _leaf(t: Tensor, grad: bool) -> Tensor:
    return t.detach().clone().requires_grad_(grad and t.is_floating_point())


def _fresh(inputs: dict, case: Case, train: bool) -> dict:
    """New leaves of the inputs for one row (gradients never mix between rows)."""
    differentiable = set(case.grad_acts) | set(case.weights)
    return {k: _leaf(v, train and k in differentiable) if isinstance(v, Tensor) else v for k, v in inputs.items()}


def _backward(outputs: tuple, inputs: dict) -> None:
    """Backward of a step's outputs: dy for the first, ``inputs["one"]`` for a scalar second (an
    auxiliary loss); the cotangents are made before (outside the meter), as measure_layer's."""
    tensors, grads = [outputs[0]], [inputs["dy"].to(outputs[0].dtype)]
    for extra in outputs[1:]:
        if isinstance(extra, Tensor) and extra.dim() == 0 and extra.requires_grad:
            tensors.append(extra)
            grads.append(inputs["one"])
    torch.autograd.backward(tensors, grads)


def _with_cotangents(inputs: dict) -> dict:
    """The inputs with the scalar cotangent of an auxiliary loss (fp32, as the layers return it)."""
    return {**inputs, "one": torch.ones((), device=DEVICE)}


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def minimum_bytes(case: Case, inputs: dict) -> int:
    """The traffic no implementation avoids (``meter.measure_layer``'s definition): read the
    activations and weights and write y (the size of dy); in training also read dy, the
    activations and the weights and write the activations' and the weights' gradients."""
    acts = sum(_nbytes(inputs[n]) for n in case.acts)
    weights = sum(_nbytes(inputs[n]) for n in case.weights)
    y = _nbytes(inputs["dy"])
    forward = acts + weights + y
    if case.mode == "fwd":
        return forward
    return forward + y + acts + weights + sum(_nbytes(inputs[n]) for n in case.grad_acts) + weights


# ------------------------------------------------------------------------------------------------
# measuring a row: check, meter, time


def check_row(case: Case, row: Row, dtype: torch.dtype) -> dict[str, float]:
    """Worst per-row errors of the row against the float64 reference of its math, at n_check."""
    train = case.mode == "train"
    make = case.check_inputs or case.make_inputs
    inputs = _with_cotangents(make(case.n_check, dtype, explicit_noise=True))
    prepared = row.prepare(_fresh(inputs, case, train))
    if train:
        outputs = prepared.run()
        _backward(outputs, inputs)
    else:
        with torch.no_grad():
            outputs = prepared.run()
    as64 = {k: _leaf(v.double() if v.is_floating_point() else v, train) if isinstance(v, Tensor) else v
            for k, v in inputs.items()}
    as64["one"] = torch.ones((), device=DEVICE, dtype=torch.float64)
    expected = row.reference(as64)
    errors = {f"out{i}": max_row_error(out, ref) for i, (out, ref) in enumerate(zip(outputs, expected))}
    if train:
        _backward(expected, as64)
        for name, grad in prepared.grads().items():
            expected_grad = as64[name].grad if as64[name].grad is not None else torch.zeros_like(as64[name])
            errors[f"d{name}"] = max_row_error(grad, expected_grad)
    return errors


def meter_row(case: Case, row: Row) -> tuple[PeerMeter, dict]:
    """The row's step at n_meter in fp16 under :class:`PeerMeter` (dry run)."""
    train = case.mode == "train"
    inputs = _with_cotangents(case.make_inputs(case.n_meter, torch.float16, explicit_noise=False))
    prepared = row.prepare(_fresh(inputs, case, train))
    with PeerMeter(dry_run=True) as meter:
        if train:
            _backward(prepared.run(), inputs)
        else:
            with torch.no_grad():
                prepared.run()
    return meter, inputs


def time_row(case: Case, row: Row, warmup: int = 5, reps: int = 20) -> float:
    """Median CUDA-event time (µs) of the row's step at n_meter in fp16, after ``warmup`` calls."""
    train = case.mode == "train"
    inputs = _with_cotangents(case.make_inputs(case.n_meter, torch.float16, explicit_noise=False))
    prepared = row.prepare(_fresh(inputs, case, train))

    def step():
        for leaf in prepared.leaves:
            leaf.grad = None
        if train:
            _backward(prepared.run(), inputs)
        else:
            with torch.no_grad():
                prepared.run()

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def _first_line(err: Exception) -> str:
    """The last line of an error's message (Triton's interpreter puts the cause there), shortened."""
    return (str(err).strip().splitlines() or [""])[-1][:160]


def measure(case: Case, check_dtype: torch.dtype, compile_cpu: bool) -> list[Result]:
    """Every row of a case: its check, meters and (on CUDA) time; rows that cannot run say why."""
    results = []
    for row in case.rows:
        result = Result(row)
        results.append(result)
        if row.skip:
            result.skipped = row.skip
            continue
        if row.compiled and not CUDA and not compile_cpu:
            result.check = "(--compile-cpu)"
        else:
            try:
                with scattermoe_routing(compiled=False):
                    result.errors = check_row(case, row, check_dtype)
            except Unavailable as why:
                result.skipped = str(why)
                continue
            except Exception as err:  # noqa: BLE001 - a peer kernel the interpreter cannot run: said, then metered
                result.check = "error"
                result.errors = {"error": f"{type(err).__name__}: {_first_line(err)}"}
            else:
                worst = max(result.errors.values(), key=lambda e: math.inf if e != e else e)
                result.check = f"{worst:.1e}" + ("" if worst <= TOL[check_dtype] else " FAIL")
        try:
            if CUDA:  # first: autotuners (a peer's, or this project's) tune at n_meter before the dry-run meter
                with scattermoe_routing(compiled=True):
                    result.gpu_us = time_row(case, row)
            why_not = "compiled" if row.compiled else case.meter_skip(row)
            if why_not is None:
                with scattermoe_routing(compiled=False):
                    meter, inputs = meter_row(case, row)
        except Exception as err:  # noqa: BLE001 - said in the report; the other rows go on
            result.check, result.errors = "error", {"error": f"{type(err).__name__}: {_first_line(err)}"}
            continue
        if why_not is None:
            minimum = minimum_bytes(case, inputs)
            result.launches, result.syncs = str(meter.launches), str(meter.syncs)
            result.mb, result.x_min = f"{meter.bytes / 1e6:.1f}", f"{meter.bytes / minimum:.2f}"
            result.eager_us = f"{meter.seconds(H100, captured=False) * 1e6:.1f}"
            result.graph_us = "-" if meter.syncs else f"{meter.seconds(H100, captured=True) * 1e6:.1f}"
        elif why_not != "compiled":
            result.launches = f"({why_not})"
    peers = [r.gpu_us for r in results if r.gpu_us is not None and not r.row.ours]
    if peers:
        for r in results:
            if r.gpu_us is not None:
                r.ratio = f"{r.gpu_us / min(peers):.2f}"
    return results


# ------------------------------------------------------------------------------------------------
# the MoE layer


MOE_NAMES = ("w_gate", "w_noise", "w1", "b1", "v", "b_v", "w2", "b2")


def moe_inputs(m: int, d_h: int, t: int, shared: bool, seed: int = 0):
    """make_inputs for an MoE case: x (n, m) and dy in ``dtype``, W_g and W_noise fp32 (the layer
    keeps its gate in fp32), the expert weights in ``dtype`` (V, W_2 shared or one per expert), the
    gate noise (n, t) fp32 (given to rows that use noise in the check, drawn by them in meters)."""

    def make(n: int, dtype: torch.dtype, explicit_noise: bool) -> dict:
        g = torch.Generator().manual_seed(seed)
        lead = () if shared else (t,)
        shapes = {"w_gate": (m, t), "w_noise": (m, t), "w1": (t, m, d_h), "b1": (t, d_h), "v": (*lead, m, d_h),
                  "b_v": (*lead, d_h), "w2": (*lead, d_h, m), "b2": (*lead, m)}
        scales = {"w_gate": 0.5, "w_noise": 0.5, "w1": m**-0.5, "v": m**-0.5, "w2": d_h**-0.5}
        inputs = {name: (torch.randn(*shape, generator=g) * scales.get(name, 0.1)).to(
            DEVICE, torch.float32 if name in ("w_gate", "w_noise") else dtype) for name, shape in shapes.items()}
        inputs["x"] = torch.randn(n, m, generator=g).to(DEVICE, dtype)
        inputs["noise"] = torch.randn(n, t, generator=g).to(DEVICE) if explicit_noise else None
        inputs["dy"] = torch.randn(n, m, generator=g).to(DEVICE, dtype)
        return inputs

    return make


def _moe_math(k: int, train: bool, noisy: bool, aux: bool, biases: bool = True):
    """The float64 reference of a row: the layer with or without noise, aux and biases."""

    def reference(p: dict) -> tuple:
        weights = [p[n] if biases or n not in ("b1", "b_v", "b2") else torch.zeros_like(p[n]) for n in MOE_NAMES]
        y, a = moe_reference(p["x"], *weights, k, train, noise=p["noise"] if noisy else None, noisy_gating=noisy)
        return (y, a) if aux else (y,)

    return reference


def _mlit_moe(variant: str, k: int, train: bool) -> Callable[[dict], Prepared]:
    def prepare(p: dict) -> Prepared:
        from mlit_kernels.functional import moe_triton  # Triton decides interpret-or-compile on first import

        leaves = [p["x"], *(p[n] for n in MOE_NAMES)]

        def run():
            if train:
                return moe_triton(p["x"], *(p[n] for n in MOE_NAMES), k, True, noise=p["noise"], variant=variant)
            return (moe_triton(p["x"], *(p[n] for n in MOE_NAMES), k, False, variant=variant, need_aux=False)[0],)

        return Prepared(run, leaves, lambda: {n: t.grad for n, t in zip(("x", *MOE_NAMES), leaves)})

    return prepare


def _reference_moe(k: int, train: bool, compiled: bool) -> Callable[[dict], Prepared]:
    fn = torch.compile(moe_reference) if compiled else moe_reference

    def prepare(p: dict) -> Prepared:
        leaves = [p["x"], *(p[n] for n in MOE_NAMES)]

        def run():
            y, aux = fn(p["x"], *(p[n] for n in MOE_NAMES), k, train, noise=p["noise"])
            return (y, aux) if train else (y,)

        return Prepared(run, leaves, lambda: {n: t.grad for n, t in zip(("x", *MOE_NAMES), leaves)})

    return prepare


def _torch_gate(x: Tensor, w_gate: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The router as the peers' users write it (HF Mixtral / Granite, ScatterMoE's injection):
    logits, softmax in fp32, top-k, renormalised, in x's dtype. Logits in fp32 here (the case's
    W_g is fp32), so every row routes the same tokens to the same experts."""
    logits = x.float() @ w_gate
    weights, experts = torch.topk(torch.softmax(logits, dim=1, dtype=torch.float32), k, dim=-1)
    return (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype), experts


def _per_expert(p: dict) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """V, b_V, W_2, b_2 with a leading expert dimension (shared ones expanded: t views of one)."""
    t = p["w1"].shape[0]
    if p["v"].dim() == 3:
        return p["v"], p["b_v"], p["w2"], p["b2"]
    return (p["v"].expand(t, -1, -1), p["b_v"].expand(t, -1), p["w2"].expand(t, -1, -1), p["b2"].expand(t, -1))


def _shared_back(p: dict, grads: dict) -> dict:
    """Per-expert gradients of V, b_V, W_2, b_2 summed over the experts where the case shares them."""
    if p["v"].dim() == 2:
        for name in ("v", "b_v", "w2", "b2"):
            if name in grads:
                grads[name] = grads[name].sum(0)
    return grads


def _scattermoe(k: int) -> Callable[[dict], Prepared]:
    """ScatterMoE's GLUMLP (bias=True) with the torch gate: expert weight rows [0, d_h) the value
    projection V, [d_h, 2 d_h) the gate projection W_1 (GLUMLP applies the activation to its second half)."""

    def prepare(p: dict) -> Prepared:
        smoe = load("scattermoe")
        t, m, d = p["w1"].shape
        v, b_v, w2, b2 = _per_expert(p)
        mlp = smoe.mlp.GLUMLP(m, d, t, k, bias=True).to(DEVICE, p["x"].dtype)
        with torch.no_grad():
            mlp.experts.weight.copy_(torch.cat([v, p["w1"]], dim=2).transpose(1, 2))
            mlp.experts.bias.copy_(torch.cat([b_v, p["b1"]], dim=1))
            mlp.output_experts.weight.copy_(w2.transpose(1, 2))
            mlp.output_experts.bias.copy_(b2)
        x, w_gate = p["x"], p["w_gate"]

        def run():
            weights, experts = _torch_gate(x, w_gate, k)
            return (mlp(x, weights, experts),)

        def grads():
            gw, gb = mlp.experts.weight.grad, mlp.experts.bias.grad
            return _shared_back(p, {"x": x.grad, "w_gate": w_gate.grad, "w1": gw[:, d:].transpose(1, 2),
                                    "b1": gb[:, d:], "v": gw[:, :d].transpose(1, 2), "b_v": gb[:, :d],
                                    "w2": mlp.output_experts.weight.grad.transpose(1, 2),
                                    "b2": mlp.output_experts.bias.grad})

        return Prepared(run, [x, w_gate, *mlp.parameters()], grads)

    return prepare


@contextlib.contextmanager
def scattermoe_routing(compiled: bool):
    """ScatterMoE wraps its routing (sort, bincount, cumsum) in torch.compile: as written for GPU
    timings; eager for checks and meters (the meter sees the torch ops, not inductor's kernels)."""
    try:
        smoe = load("scattermoe")
    except Unavailable:
        yield
        return
    written = smoe.parallel_experts.flatten_sort_count  # the torch.compile'd function, as ScatterMoE has it
    smoe.mlp.flatten_sort_count = written if compiled else getattr(written, "_torchdynamo_orig_callable", written)
    try:
        yield
    finally:
        smoe.mlp.flatten_sort_count = written


def _liger_moe(k: int) -> Callable[[dict], Prepared]:
    """Liger-Kernel's LigerFusedMoEFunction (gate_up rows: W_1 then V; no biases) with the torch gate."""

    def prepare(p: dict) -> Prepared:
        ops = load("liger")
        v, _, w2, _ = _per_expert(p)
        gate_up = torch.cat([p["w1"], v], dim=2).transpose(1, 2).contiguous().detach().requires_grad_()
        down = w2.transpose(1, 2).contiguous().detach().requires_grad_()
        x, w_gate = p["x"], p["w_gate"]
        d = p["w1"].shape[2]

        def run():
            weights, experts = _torch_gate(x, w_gate, k)
            return (ops.LigerFusedMoEFunction.apply(x, gate_up, down, experts.to(torch.int32), weights),)

        def grads():
            return _shared_back(p, {"x": x.grad, "w_gate": w_gate.grad, "w1": gate_up.grad[:, :d].transpose(1, 2),
                                    "v": gate_up.grad[:, d:].transpose(1, 2), "w2": down.grad.transpose(1, 2)})

        return Prepared(run, [x, w_gate, gate_up, down], grads)

    return prepare


def _align_block_size(experts: Tensor, block: int, t: int) -> tuple[Tensor, Tensor, Tensor]:
    """What vLLM's ``moe_align_block_size`` (a CUDA op of vllm._C) returns, in torch, sync-free:
    the (token, pick) indices sorted by expert, each expert padded to a multiple of ``block`` (pad
    = the pair count); each block's expert; the padded total (1,)."""
    flat = experts.flatten()
    pairs = flat.numel()
    capacity = pairs + t * (block - 1) if pairs >= t else min(pairs * block, pairs + t * (block - 1))
    counts = torch.zeros(t, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block - 1) // block * block
    ends = padded.cumsum(0)
    order = torch.argsort(flat, stable=True)
    by_expert = flat[order]
    rank = torch.arange(pairs, device=flat.device) - (counts.cumsum(0) - counts)[by_expert]
    sorted_ids = torch.full((capacity,), pairs, dtype=torch.int32, device=flat.device)
    sorted_ids[(ends - padded)[by_expert] + rank] = order.to(torch.int32)
    starts = torch.arange(0, capacity, block, device=flat.device)
    expert_ids = torch.searchsorted(ends, starts, right=True).clamp_max(t - 1).to(torch.int32)
    return sorted_ids, expert_ids, ends[-1:].to(torch.int32)


def _vllm_moe(k: int) -> Callable[[dict], Prepared]:
    """vLLM's fused_experts for fp16 without quantization, around its Triton kernel: routing,
    w13 GEMM (+ b13), silu(gate) · up, w2 GEMM (+ b2, × routing weight), sum over the k picks."""

    def prepare(p: dict) -> Prepared:
        vllm = load("vllm")
        import triton.language as tl

        t, m, d = p["w1"].shape
        v, b_v, w2, b2 = _per_expert(p)
        w13 = torch.cat([p["w1"], v], dim=2).transpose(1, 2).contiguous()  # (t, 2 d_h, m): silu half first
        b13 = torch.cat([p["b1"], b_v], dim=1).contiguous()
        w2t, b2c = w2.transpose(1, 2).contiguous(), b2.contiguous()
        x, w_gate = p["x"], p["w_gate"]
        n = x.shape[0]
        config = vllm.get_default_config(n, t, 2 * d, m, k, None)
        compute = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[x.dtype]

        def gemm(a, b, bias, c, weights, sorted_ids, expert_ids, total, routed: bool, top_k: int):
            cfg = dict(config, SPLIT_K=1)
            block_k = cfg.pop("BLOCK_SIZE_K")
            em = sorted_ids.shape[0]
            if a.shape[0] < cfg["BLOCK_SIZE_M"]:
                em = min(em, a.shape[0] * top_k * cfg["BLOCK_SIZE_M"])
            grid = (math.ceil(em / cfg["BLOCK_SIZE_M"]) * math.ceil(b.shape[1] / cfg["BLOCK_SIZE_N"]),)
            vllm.fused_moe_kernel[grid](
                a, b, c, bias, None, None, weights, sorted_ids, expert_ids, total, b.shape[1], b.shape[2], em,
                a.shape[0] * top_k, a.stride(0), a.stride(1), b.stride(0), b.stride(2), b.stride(1), c.stride(1),
                c.stride(2), 0, 0, 0, 0, 0, bias.stride(0), bias.stride(1), 0, 0, MUL_ROUTED_WEIGHT=routed,
                top_k=top_k, compute_type=compute, use_fp8_w8a8=False, use_int8_w8a8=False, use_int8_w8a16=False,
                per_channel_quant=False, naive_block_assignment=False, HAS_BIAS=True, BLOCK_SIZE_K=block_k,
                SWAP_AB=False, USE_TD=False, **cfg)

        def run():
            weights, experts = _torch_gate(x, w_gate, k)
            sorted_ids, expert_ids, total = _align_block_size(experts, config["BLOCK_SIZE_M"], t)
            cache1 = torch.empty(n, k, 2 * d, device=x.device, dtype=x.dtype)
            gemm(x, w13, b13, cache1, weights, sorted_ids, expert_ids, total, False, k)
            hidden = F.silu(cache1[..., :d]) * cache1[..., d:]
            cache3 = torch.empty(n, k, m, device=x.device, dtype=x.dtype)
            gemm(hidden.view(n * k, d), w2t, b2c, cache3, weights, sorted_ids, expert_ids, total, True, 1)
            return (cache3.sum(dim=1),)

        return Prepared(run, [], dict)

    return prepare


#: (name, m, d_h, t, k, V / W_2 shared, tokens metered)
MOE_SHAPES = (
    ("S layer 0", 144, 144, 3, 2, True, 256 * 145),
    ("XXS last layer", 108, 27, 5, 2, True, 256 * 145),
    ("t16 256/1024", 256, 1024, 16, 2, False, 8192),
    ("t64 1024/1024", 1024, 1024, 64, 2, False, 8192),
)
SMOKE_MOE_SHAPES = (("smoke shared", 32, 48, 4, 2, True, 64), ("smoke per expert", 32, 32, 8, 2, False, 64))
#: The eager reference computes every expert for every token: not run past this many FLOPs on a CPU.
CPU_REFERENCE_FLOPS = 2e11
#: Through the interpreter the many-expert shapes take tens of minutes a check: on a CPU they are
#: checked at this m / d_h (same t, k and sharing), metered at their own.
CPU_CHECK_WIDTHS = (64, 128)


def moe_cases(shapes, n_check: int) -> list[Case]:
    """Per shape a "fwd" case (the layer in evaluation: top-k gate, no noise; no auxiliary loss
    asked for) and a "train" case (the paper's layer: noisy top-k gate, SwiGLU experts, balancing
    loss; forward + backward)."""
    from mlit_kernels.variants import DENSE_LIMIT

    torch_version = f"torch {torch.__version__}"
    cases = []
    for name, m, d_h, t, k, shared, n_meter in shapes:
        for mode in ("fwd", "train"):
            train = mode == "train"
            sharing = "shared V / W2" if shared else "V / W2 per expert"
            case = Case("moe", f"{name} ({m}/{d_h}/{t}/{k}, {sharing})", mode, n_check, n_meter,
                        moe_inputs(m, d_h, t, shared), ("x",), ("x",), MOE_NAMES)
            if not CUDA and m * d_h > 2 * 144 * 144:
                case.check_inputs = moe_inputs(*CPU_CHECK_WIDTHS, t, shared)
                case.check_shape = f"{CPU_CHECK_WIDTHS[0]}/{CPU_CHECK_WIDTHS[1]}/{t}/{k}"
            exact = _moe_math(k, train, noisy=train, aux=train)
            peer = _moe_math(k, train, noisy=False, aux=False)
            differs = (("training: top-k softmax gate without noise, no balancing loss",) if train else ()) + (
                ("shared V / W2: t per-expert copies of them",) if shared else ())
            if shared and t <= DENSE_LIMIT:
                case.rows.append(Row("mlit dense", mlit_version(), _mlit_moe("dense", k, train), exact, ours=True))
            case.rows += [
                Row("mlit dispatch", mlit_version(), _mlit_moe("dispatch", k, train), exact, ours=True),
                Row("reference (eager)", torch_version, _reference_moe(k, train, False), exact),
                Row("torch.compile(reference)", torch_version, _reference_moe(k, train, True), exact, compiled=True),
                _peer_row("ScatterMoE", "scattermoe", _scattermoe(k), peer,
                          differs + ("routing (sort, bincount, cumsum) eager here; torch.compile'd as written "
                                     "on a GPU",)),
                _peer_row("Liger fused MoE", "liger", _liger_moe(k),
                          _moe_math(k, train, noisy=False, aux=False, biases=False), differs + ("no biases",))]
            if train:
                case.rows.append(Row("vLLM fused_moe", "-", _vllm_moe(k), peer,
                                     skip="forward only (an inference kernel)"))
            else:
                case.rows.append(_peer_row("vLLM fused_moe", "vllm", _vllm_moe(k), peer, differs + (
                    "the two fused_moe_kernel launches are vLLM's; its routing (moe_align_block_size), silu_and_mul "
                    "and moe_sum are CUDA ops of vllm._C, here torch (counted as torch)",)))
            flops = 6 * n_meter * t * m * d_h * (3 if train else 1)
            if flops > CPU_REFERENCE_FLOPS and not CUDA:
                case.meter_skip = lambda row: "too large for a CPU" if row.name.startswith("reference") else None
            cases.append(case)
    return cases


def _peer_row(name: str, peer: str, prepare, reference, notes: tuple[str, ...] = ()) -> Row:
    """A peer's row, or the row that says why the peer is skipped."""
    try:
        version = load(peer).version
    except Unavailable as why:
        return Row(name, "-", prepare, reference, notes, skip=str(why))
    return Row(name, version, prepare, reference, notes)


# ------------------------------------------------------------------------------------------------
# the rest of the step: norm + linear, the loss, a dense SwiGLU, the attention half-block


def norm_linear_inputs(d: int, e: int):
    def make(n: int, dtype: torch.dtype, explicit_noise: bool) -> dict:
        g = torch.Generator().manual_seed(1)
        shapes = {"x": (n, d), "ln_w": (d,), "ln_b": (d,), "w": (e, d), "b": (e,), "dy": (n, e)}
        scales = {"ln_w": 0.2, "ln_b": 0.2, "w": d**-0.5, "b": 0.1}
        inputs = {name: torch.randn(*shape, generator=g) * scales.get(name, 1.0) for name, shape in shapes.items()}
        inputs["ln_w"] += 1.0
        return {name: t.to(DEVICE, dtype) for name, t in inputs.items()}

    return make


def _norm_linear_rows() -> list[Row]:
    names = ("x", "ln_w", "ln_b", "w", "b")

    def reference(p):
        return (F.linear(F.layer_norm(p["x"], p["x"].shape[-1:], p["ln_w"], p["ln_b"]), p["w"], p["b"]),)

    def prepared(p, fn):
        leaves = [p[n] for n in names]
        return Prepared(lambda: (fn(*leaves),), leaves, lambda: {n: t.grad for n, t in zip(names, leaves)})

    def ours(p):
        from mlit_kernels.norm_linear import norm_linear

        return prepared(p, norm_linear)

    def liger(p):
        ops = load("liger")
        return prepared(p, lambda x, ln_w, ln_b, w, b: F.linear(ops.LigerLayerNormFunction.apply(x, ln_w, ln_b, 1e-5),
                                                                   w, b))

    eager = (lambda x, ln_w, ln_b, w, b: F.linear(F.layer_norm(x, x.shape[-1:], ln_w, ln_b), w, b))
    compiled = torch.compile(eager)
    return [Row("mlit norm_linear", mlit_version(), ours, reference, ours=True),
            _peer_row("Liger LayerNorm + F.linear", "liger", liger, reference, () if CUDA else (
                "meters: its backward's partial sums are sized by the device's SM count, 1 on a CPU",)),
            Row("torch eager", f"torch {torch.__version__}", lambda p: prepared(p, eager), reference),
            Row("torch.compile", f"torch {torch.__version__}", lambda p: prepared(p, compiled), reference,
                compiled=True)]


SMOOTHING = 0.1


def loss_inputs(classes: int):
    def make(n: int, dtype: torch.dtype, explicit_noise: bool) -> dict:
        g = torch.Generator().manual_seed(2)
        return {"logits": (torch.randn(n, classes, generator=g) * 2).to(DEVICE, dtype),
                "labels": torch.randint(0, classes, (n,), generator=g).to(DEVICE),
                "dy": torch.ones((), device=DEVICE, dtype=torch.float32)}

    return make


def _loss_rows() -> list[Row]:
    def reference(p):
        return (F.cross_entropy(p["logits"], p["labels"], label_smoothing=SMOOTHING),)

    def prepared(p, fn):
        return Prepared(lambda: (fn(p["logits"], p["labels"]),), [p["logits"]], lambda: {"logits": p["logits"].grad})

    def ours(p):
        from mlit_kernels.loss.ops import fused_classification_loss

        aux = torch.zeros((), device=p["logits"].device)
        return prepared(p, lambda z, y: fused_classification_loss(z, y, aux, SMOOTHING, 0.0)[0])

    def liger(p):
        ops = load("liger")
        return prepared(p, lambda z, y: ops.LigerCrossEntropyFunction.apply(z, y, None, -100, 0.0, SMOOTHING)[0])

    eager = (lambda z, y: F.cross_entropy(z, y, label_smoothing=SMOOTHING))
    compiled = torch.compile(eager)
    return [Row("mlit loss kernel", mlit_version(), ours, reference,
                ("also the metrics vector (loss, ce, aux, correct)",),
                ours=True),
            _peer_row("Liger cross-entropy", "liger", liger, reference, (
                "writes the logits' gradient over the logits in its forward: the meter counts a tensor a launch "
                "reads and writes once, so its bytes are below the traffic (× min may fall under 1)",)),
            Row("torch eager", f"torch {torch.__version__}", lambda p: prepared(p, eager), reference),
            Row("torch.compile", f"torch {torch.__version__}", lambda p: prepared(p, compiled), reference,
                compiled=True)]


def _swiglu_rows() -> list[Row]:
    """A dense SwiGLU MLP y = (silu(x W1 + b1) ⊙ (x V + b_V)) W2 + b2: this project's fused MoE
    kernels at t = 1, k = 1 (the gate's softmax over one expert is 1, its balancing loss 0)."""
    names = ("x", "w1", "b1", "v", "b_v", "w2", "b2")

    def reference(p):
        h = F.silu(p["x"] @ p["w1"][0] + p["b1"][0]) * (p["x"] @ p["v"] + p["b_v"])
        return (h @ p["w2"] + p["b2"],)

    def dense_mlp(silu_mul):
        def prepare(p):
            leaves = [p[n] for n in names]
            x, w1, b1, v, b_v, w2, b2 = leaves
            return Prepared(lambda: (silu_mul(x @ w1[0] + b1[0], x @ v + b_v) @ w2 + b2,), leaves,
                            lambda: {n: t.grad for n, t in zip(names, leaves)})

        return prepare

    def ours(p):
        prepared = _mlit_moe("dense", 1, True)(p)
        return Prepared(lambda: prepared.run()[:1], prepared.leaves,
                        lambda: {n: g for n, g in prepared.grads().items() if n in names})

    def liger(p):
        ops = load("liger")
        return dense_mlp(lambda a, b: ops.LigerSiLUMulFunction.apply(a, b))(p)

    eager = (lambda a, b: F.silu(a) * b)
    return [Row("mlit fused MoE, t = 1", mlit_version(), ours, reference, ("also the gate and its loss (one expert)",),
                ours=True),
            _peer_row("Liger SiLUMul + 3 matmuls", "liger", liger, reference),
            Row("torch eager", f"torch {torch.__version__}", dense_mlp(eager), reference),
            Row("torch.compile", f"torch {torch.__version__}", dense_mlp(torch.compile(eager)), reference,
                compiled=True)]


def attention_inputs(d: int, heads: int, groups: int, seq: int):
    def make(n: int, dtype: torch.dtype, explicit_noise: bool) -> dict:
        g = torch.Generator().manual_seed(3)
        e = d + 2 * groups * (d // heads)
        shapes = {"x": (n // seq, seq, d), "ln_w": (d,), "ln_b": (d,), "qkv_w": (e, d), "qkv_b": (e,),
                  "proj_w": (d, d), "proj_b": (d,), "dy": (n // seq, seq, d)}
        scales = {"ln_w": 0.2, "ln_b": 0.2, "qkv_w": d**-0.5, "proj_w": d**-0.5, "qkv_b": 0.1, "proj_b": 0.1}
        inputs = {name: torch.randn(*shape, generator=g) * scales.get(name, 1.0) for name, shape in shapes.items()}
        inputs["ln_w"] += 1.0
        return {name: t.to(DEVICE, dtype) for name, t in inputs.items()}

    return make


ATTENTION_NAMES = ("x", "ln_w", "ln_b", "qkv_w", "qkv_b", "proj_w", "proj_b")


def _attention_rows(heads: int, groups: int) -> list[Row]:
    def reference(p):
        from mlit_kernels.attention.reference import attention_block_reference

        return (attention_block_reference(*(p[n] for n in ATTENTION_NAMES), heads, groups),)

    def block(backend: str, compiled: bool):
        """The model's half-block, GroupedQueryAttention with the pre-norm LayerNorm (torch: SDPA,
        head dims zero-padded to 8 on CUDA; triton: the fused kernels), the case's weights loaded."""
        from mlit.models import GroupedQueryAttention

        def prepare(p):
            d = p["x"].shape[-1]
            norm = nn.LayerNorm(d).to(DEVICE, p["x"].dtype)
            attn = GroupedQueryAttention(d, heads, groups, backend=backend).to(DEVICE, p["x"].dtype)
            params = (norm.weight, norm.bias, attn.qkv.weight, attn.qkv.bias, attn.proj.weight, attn.proj.bias)
            with torch.no_grad():
                for param, name in zip(params, ATTENTION_NAMES[1:]):
                    param.copy_(p[name])
            fn = torch.compile(attn) if compiled else attn
            x = p["x"]
            return Prepared(lambda: (fn(x, norm=norm),), [x, *params],
                            lambda: {n: t.grad for n, t in zip(ATTENTION_NAMES, (x, *params))})

        return prepare

    return [Row("mlit attention block", mlit_version(), block("triton", False), reference, ours=True),
            Row("torch SDPA eager", f"torch {torch.__version__}", block("reference", False), reference,
                () if CUDA else ("meters on a CPU: SDPA's CPU kernel, head dims unpadded (zero-padded to 8 on CUDA)",)),
            Row("torch.compile(SDPA path)", f"torch {torch.__version__}", block("reference", True), reference,
                compiled=True)]


def step_cases(smoke: bool, n_check: int) -> list[Case]:
    """The rest of the training step, forward + backward, where a peer exists."""
    cases = []
    heads = (("classifier head, XXS (108 → 10)", 108, 10, 256), ("MAE pixel head (108 → 27)", 108, 27, 256 * 145))
    losses = (("loss, 10 classes", 10, 256), ("loss, 100 classes", 100, 256))
    swiglus = (("S layer 0 expert (144/144)", 144, 144, 256 * 145), ("XXS last expert (108/27)", 108, 27, 256 * 145))
    attention = (("XXS (108/6/3)", 108, 6, 3, 256 * 145), ("S (144/8/4)", 144, 8, 4, 256 * 145))
    if smoke:
        heads, losses = (("smoke head", 32, 10, 64),), (("smoke loss", 10, 64),)
        swiglus, attention = (("smoke expert", 32, 48, 64),), (("smoke", 36, 6, 3, 2 * 17),)
    for name, d, e, n in heads:
        cases.append(Case("norm + linear", name, "train", n_check, n, norm_linear_inputs(d, e), ("x",), ("x",),
                          ("ln_w", "ln_b", "w", "b"), _norm_linear_rows()))
    for name, classes, n in losses:
        cases.append(Case("loss", name, "train", n_check, n, loss_inputs(classes), ("logits", "labels"),
                          ("logits",), (), _loss_rows()))
    for name, m, d_h, n in swiglus:
        make = moe_inputs(m, d_h, 1, True)
        cases.append(Case("SwiGLU", name, "train", n_check, n, make, ("x",), ("x",),
                          ("w1", "b1", "v", "b_v", "w2", "b2"), _swiglu_rows()))
    for name, d, h, g, n in attention:
        seq = 17 if smoke else 145
        cases.append(Case("attention", name, "train", 2 * seq, n, attention_inputs(d, h, g, seq), ("x",), ("x",),
                          ATTENTION_NAMES[1:], _attention_rows(h, g)))
    return cases


# ------------------------------------------------------------------------------------------------
# tables


COLUMNS = ("case", "mode", "row", "version", "check", "launches", "syncs", "MB", "× min", "H100 µs graph",
           "H100 µs eager", "GPU µs", "× best peer")


def table(rows: list[list[str]], markdown: bool) -> str:
    if markdown:
        return "\n".join(["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
                         + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(x) for x in col) for col in zip(COLUMNS, *rows)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in [COLUMNS, *rows])


def measure_all(cases: list[Case], check_dtype: torch.dtype, compile_cpu: bool) -> list[tuple[Case, list[Result]]]:
    """:func:`measure` of every case, with a line on stderr as each is done."""
    measured = []
    for case in cases:
        measured.append((case, measure(case, check_dtype, compile_cpu)))
        print(f"  {case.part}: {case.name} {case.mode} done", file=sys.stderr, flush=True)
    return measured


def report(measured: list[tuple[Case, list[Result]]], markdown: bool) -> str:
    """One table of every row that ran, then what rows compute where it differs, and the skips."""
    lines, notes, skipped, failed = [], {}, {}, {}
    for case, results in measured:
        for r in results:
            if r.skipped:
                skipped.setdefault((r.row.name, r.skipped), []).append(f"{case.name} {case.mode}")
                continue
            notes.setdefault(r.row.name, set()).update(r.row.notes)
            if r.check == "error":
                failed.setdefault((r.row.name, r.errors["error"]), []).append(f"{case.name} {case.mode}")
            gpu = f"{r.gpu_us:.1f}" if r.gpu_us is not None else "-"
            if case.check_shape:
                notes.setdefault("checked at a smaller width (the interpreter)", set()).add(
                    f"{case.name}: checked at m/d_h/t/k = {case.check_shape}")
            lines.append([case.name, case.mode, r.row.name, r.row.version, r.check, r.launches, r.syncs, r.mb, r.x_min,
                          r.graph_us, r.eager_us, gpu, r.ratio])
    out = [table(lines, markdown), ""]
    for name, why in notes.items():
        if why:
            out.append(f"- {name}: {'; '.join(sorted(why))}")
    for (name, why), where in failed.items():
        out.append(f"- error: {name} ({len(where)} cases; its meters above are of a dry run): {why}")
    for (name, why), where in skipped.items():
        out.append(f"- skipped: {name} ({len(where)} cases): {why}")
    return "\n".join(out)


def _leave_out(cases: list[Case], no_compile: bool, exclude: set[str]) -> None:
    """Rows left out by the command line (a skip line in the report says so)."""
    for case in cases:
        for row in case.rows:
            if row.compiled and no_compile:
                row.skip = "left out (--no-compile)"
            if row.name in exclude:
                row.skip = "left out (--exclude)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fetch", action="store_true", help="fetch the peers at their pinned versions, then exit")
    parser.add_argument("--scattermoe-git", help="a local clone or git directory of ScatterMoE for --fetch")
    parser.add_argument("--parts", default="moe,step", help="comma-separated: moe, step")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes (seconds; the test's mode)")
    parser.add_argument("--markdown", action="store_true", help="markdown tables")
    parser.add_argument("--compile-cpu", action="store_true", help="check the torch.compile rows on a CPU too")
    parser.add_argument("--no-compile", action="store_true", help="leave the torch.compile rows out")
    parser.add_argument("--exclude", default="", help="row names to leave out, separated by ';' (e.g. 'mlit dense')")
    parser.add_argument("--check-tokens", type=int, default=None, help="tokens of the correctness check")
    args = parser.parse_args(argv)
    if args.fetch:
        fetch(args.scattermoe_git)
        return 0
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    check_dtype = torch.float16 if CUDA else torch.float32
    n_check = args.check_tokens or (40 if args.smoke else 4133 if CUDA else 100)
    import triton

    device = torch.cuda.get_device_name() if CUDA else "CPU (Triton interpreter)"
    print(f"device: {device}; torch {torch.__version__}, triton {triton.__version__}, {mlit_version()}; "
          f"check: {n_check} tokens in {str(check_dtype).removeprefix('torch.')}; meters: fp16, dry run"
          + ("; GPU: CUDA events, median of 20 after 5" if CUDA else "; no GPU: no measured times"))
    for peer in ("scattermoe", "liger", "vllm"):
        try:
            print(f"peer: {load(peer).version}")
        except Unavailable as why:
            print(f"peer skipped: {why}")
    parts = args.parts.split(",")
    exclude = {name.strip() for name in args.exclude.split(";") if name.strip()}
    if "moe" in parts:
        print("\nMoE layer\n")
        cases = moe_cases(SMOKE_MOE_SHAPES if args.smoke else MOE_SHAPES, n_check)
        _leave_out(cases, args.no_compile, exclude)
        print(report(measure_all(cases, check_dtype, args.compile_cpu), args.markdown), flush=True)
    if "step" in parts:
        print("\nThe rest of the step (forward + backward)\n")
        cases = step_cases(args.smoke, n_check)
        _leave_out(cases, args.no_compile, exclude)
        print(report(measure_all(cases, check_dtype, args.compile_cpu), args.markdown), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
