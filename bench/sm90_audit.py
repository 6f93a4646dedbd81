"""The sm_90 audit of the launched code: record what the models launch, compile exactly that for
sm_90 (no GPU: Triton's bundled ptxas), and read each kernel's dots, registers, spills and shared
memory.

    python bench/sm90_audit.py                                  # this Triton; prints the table
    python bench/sm90_audit.py --triton-env .venv-triton36      # + the Triton of that environment
    python bench/sm90_audit.py --triton-env .venv-triton36 --markdown bench/results/sm90-audit.md

1. **Record** (:func:`record`): the training and evaluation steps of mLiT-XXS, XS and S and of
   mmLiT-XXS pre-training at the recipes' batch sizes, and one MoE layer at the many-expert shapes
   (t = 16, 64), run under ``mlit_kernels.meter.Meter(dry_run=True)`` (Triton launches recorded,
   not run); each Triton launch's :class:`mlit_kernels.meter.LaunchSignature` — constexprs,
   warps, stages, and the arguments as Triton's JIT specialises them (an integer 1 becomes a
   constexpr; integers and addresses that are multiples of 16 are marked divisible), as a GPU
   launches it (:func:`as_on_gpu`: bf16 products on tensor cores, not the interpreter's fp32
   dots). Both MoE variants (dense: the design the meters count; dispatch: what "auto" runs on
   CUDA today), and every candidate of every tuner: the dense and attention configurations forced
   in turn, the dispatch ones a width allows (``configs_for(m)``).
2. **Compile** (:func:`compile_jobs`): each distinct signature with ``triton.compile`` for
   ``GPUTarget("cuda", 90, 32)`` at the launch's own warps and stages (3, Triton's default, where
   the launch names none) — with this process's Triton, and with another environment's
   (``--triton-env``, e.g. Triton 3.6.0, the GPU machines' version) in a child process. Results
   are cached by Triton version, kernel source (Triton's own cache key, the called helpers
   included) and signature (``--cache``).
3. **Read**: every dot of the TTGIR — ``ttng.warp_group_dot`` (wgmma), ``tt.dot`` with an
   ``nvidia_mma`` version 2 layout (mma.sync) or a blocked one (FMA: fp32 IEEE dots) — with its
   M×N×K; registers and spill stores from ptxas's ``-v`` log; shared memory from the metadata;
   from the SASS (Triton's bundled ``nvdisasm``), the local-memory stores and loads inside loops
   (:func:`local_memory_in_loops`: spills there run every iteration, elsewhere once a program).
4. **The rule** (:func:`breach`): on compute capability 9.x no launched kernel holds a wgmma dot
   with a 16- or 32-wide dimension beside other tensor-core dots (Triton 3.6–3.7 miscompile that:
   illegal shared-memory reads or silent corruption, triton-lang/triton #10486, #10573, #11366),
   unless a GPU run cleared that exact code on that Triton version (:func:`gpu_cleared`: the
   family's built-in clearance). ``tests/checks/test_sm90_rule.py`` pins it; the default configurations
   must also spill nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
ARCH = 90
CACHE = Path.home() / ".cache" / "mlit" / "sm90-audit"  # results by Triton version, kernel source and signature
NARROW = (16, 32)  # the dot widths of the sm_90 miscompile class
RESULT_FORMAT = 4  # what a cached result holds (2: the dots' warps, 3: local memory in loops, 4: local arrays
#                    declared in the PTX); part of the cache key


def gpu_cleared(kernel: str, triton_version: str) -> bool:
    """Whether a GPU run of this project cleared, on compute capability 9.x with ``triton_version``,
    the current code of a kernel family that launches ``kernel`` (a function name): the built-in
    table of the hash-keyed clearance (:data:`mlit_kernels.common.clearance.BUILTIN`), whose key
    covers every source that decides what the family launches. A kernel so cleared may break the
    rule: a GPU showed that code right."""
    from mlit_kernels import registry
    from mlit_kernels.common.clearance import BUILTIN
    from mlit_kernels.common.family import source_hash

    families = [f for f in registry.families() if kernel in f.kernels]
    return any(v.cleared and v.capability.startswith("9.") and v.triton == triton_version
               and v.family == f.name and v.source_hash == source_hash(f) for f in families for v in BUILTIN)


# ----------------------------------------------------------------------------------------------
# 1. record


@dataclasses.dataclass
class Recorded:
    """A distinct launch signature: who launched it, and whether a default configuration did."""

    signature: object  # mlit_kernels.meter.LaunchSignature
    origins: set = dataclasses.field(default_factory=set)
    default: bool = False


#: (label, recipe, model size) of the recorded steps: training and evaluation of each
STEP_CASES = (("mLiT-XXS", "table6-cifar10", "XXS"), ("mLiT-XS", "table6-cifar10", "XS"),
              ("mLiT-S", "table6-cifar10", "S"), ("mmLiT-XXS pretrain", "table3-cifar100", "XXS"))
#: (label, m, d_h, t, k, tokens, compute dtype) of the MoE layer alone: at the many-expert shapes
#: (issue 17's) under fp16 autocast, and at mLiT-XXS's last layer in bf16 (autocast) and fp32
#: (what a user of the drop-in layer may run; the models train under fp16 autocast)
LAYER_CASES = (("16x192/768", 192, 768, 16, 2, 256 * 145, "fp16"), ("64x384/1536", 384, 1536, 64, 2, 256 * 145, "fp16"),
               ("108/27/5 bf16", 108, 27, 5, 2, 256 * 145, "bf16"), ("108/27/5 fp32", 108, 27, 5, 2, 256 * 145, "fp32"))


def _tuner_rounds(widths: set[int], variant: str) -> list[tuple[object, object, bool]]:
    """(MoE configuration, attention configuration, default?) rounds forcing every candidate of the
    MoE variant's tuner (those every width allows, for dispatch) and of the attention tuner; the
    first round is the defaults."""
    from mlit_kernels.attention import launch as attention
    from mlit_kernels.dense import launch as dense
    from mlit_kernels.dispatch import launch as dispatch

    if variant == "dense":
        moe = list(dense.CONFIGS)
    else:
        moe = [c for c in dispatch.CONFIGS if all(c in dispatch.configs_for(m) for m in widths)]
    att = list(attention.CONFIGS)
    rounds = max(len(moe), len(att))
    return [(moe[i % len(moe)], att[i % len(att)], i == 0) for i in range(rounds)]


@contextlib.contextmanager
def _forced(variant: str, moe_config, attention_config):
    from mlit_kernels.attention import launch as attention
    from mlit_kernels.dense import launch as dense
    from mlit_kernels.dispatch import launch as dispatch

    tuner = dense.TUNER if variant == "dense" else dispatch.TUNER
    with tuner.force(moe_config), attention.TUNER.force(attention_config):
        yield


def as_on_gpu(signature):
    """A signature recorded under Triton's interpreter as a GPU launches it: DOT_F32 is the only
    constexpr the interpreter changes (:func:`mlit_kernels.common.precision.dot_f32`: bf16 products
    run as fp32 dots there, on tensor cores on a GPU)."""
    import torch

    from mlit_kernels.common.precision import dot_f32

    constexprs = dict(signature.constexprs)
    if "DOT_F32" not in constexprs:
        return signature
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[constexprs["DTYPE"]]
    constexprs["DOT_F32"] = dot_f32(dtype, interpreted=False)
    return dataclasses.replace(signature, constexprs=tuple(constexprs.items()))


def _add(found: dict, meter, origin: str, default: bool) -> None:
    for r in meter.records:
        if r.signature is None:
            continue
        signature = as_on_gpu(r.signature)
        entry = found.setdefault(signature, Recorded(signature))
        entry.origins.add(origin)
        entry.default |= default


def _record_steps(found: dict, cases, quick: bool, batch: int | None) -> None:
    import step_meters
    import torch

    from mlit_kernels import SharedSwiGLUMoE
    from mlit_kernels.meter import Meter
    from mlit.train.recipes import get_recipe

    for label, recipe_name, size in cases:
        images_per_step = batch or get_recipe(recipe_name, size).batch_size
        for variant in ("dense", "dispatch"):
            trainer, images, labels = step_meters.make_trainer(recipe_name, size, images_per_step)
            layers = [m for m in trainer.raw_model.modules() if isinstance(m, SharedSwiGLUMoE)]
            for layer in layers:
                layer.triton_variant = variant
            rounds = _tuner_rounds({layer.dim for layer in layers}, variant)
            for moe_config, attention_config, default in rounds[:1] if quick else rounds:
                with _forced(variant, moe_config, attention_config):
                    with Meter(dry_run=True) as meter:
                        trainer.train_step(images, labels)  # the first step: optimizer state made, same kernels
                    _add(found, meter, f"{label} train ({variant})", default)
                    trainer.raw_model.eval()
                    with Meter(dry_run=True) as meter, torch.no_grad():
                        trainer.evaluator._add_batch(images, labels)
                    trainer.raw_model.train()
                    _add(found, meter, f"{label} eval ({variant})", default)


def _record_layers(found: dict, cases, quick: bool, tokens: int | None) -> None:
    import torch

    from mlit_kernels import SharedSwiGLUMoE
    from mlit_kernels.common.settings import BLOCK_T
    from mlit_kernels.meter import Meter

    for label, m, d_h, t, k, n, dtype in cases:
        n = tokens or n
        autocast = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": None}[dtype]
        for variant in ("dispatch", "dense") if t <= BLOCK_T else ("dispatch",):  # dense: t <= 16
            torch.manual_seed(0)
            layer = SharedSwiGLUMoE(m, d_h, t, k=k, backend="triton", triton_variant=variant)
            x = torch.randn(n, m, requires_grad=True)
            rounds = _tuner_rounds({m}, variant)
            for moe_config, attention_config, default in rounds[:1] if quick else rounds:
                with _forced(variant, moe_config, attention_config):
                    layer.train()
                    with Meter(dry_run=True) as meter:
                        with torch.autocast("cpu", dtype=autocast or torch.float16, enabled=autocast is not None):
                            y, aux = layer(x)
                        torch.autograd.backward((y, aux), (torch.randn_like(x), torch.ones(())))
                    _add(found, meter, f"layer {label} train ({variant})", default)
                    layer.eval()
                    with Meter(dry_run=True) as meter, torch.no_grad(), torch.autocast(
                            "cpu", dtype=autocast or torch.float16, enabled=autocast is not None):
                        layer(x)
                    _add(found, meter, f"layer {label} eval ({variant})", default)


def record(quick: bool = False, steps=STEP_CASES, layers=LAYER_CASES, batch: int | None = None,
           tokens: int | None = None) -> list[Recorded]:
    """Every distinct Triton launch signature of the recorded steps and layers (module docstring);
    ``quick``: the default configurations only, at small batches; ``batch`` / ``tokens``: images
    a step and tokens a layer call instead of the recipes' and LAYER_CASES' (the constexprs do not
    depend on them; the argument specialisation and the dispatch RECOMPUTE flag may)."""
    if quick:
        batch, tokens = batch or 32, tokens or 512 + 37
    import torch

    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    found: dict = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    try:
        _record_steps(found, steps, quick, batch)
        _record_layers(found, layers, quick, tokens)
    finally:
        torch.set_num_threads(threads)
    return sorted(found.values(), key=lambda r: (r.signature.name, _json(r.signature)))


def _json(signature) -> str:
    return json.dumps(dataclasses.asdict(signature), sort_keys=True, default=str)


# ----------------------------------------------------------------------------------------------
# 2. compile


def _kernel(path: str):
    """The kernel "module:function": its JITFunction (of an autotuner too), or its
    InterpretedFunction under TRITON_INTERPRET=1."""
    module, name = path.split(":")
    fn = getattr(importlib.import_module(module), name)
    return fn.fn if type(fn).__name__ == "Autotuner" else fn


def kernel_sources(fn) -> list[str]:
    """The source of a JIT kernel, of every @triton.jit function it calls (transitively, by the
    names its code uses) and of the constexpr globals it reads, in a fixed order."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    seen, parts = set(), []

    def visit(jit):  # a JITFunction, or an InterpretedFunction under TRITON_INTERPRET=1
        if id(jit) in seen:
            return
        seen.add(id(jit))
        parts.append(inspect.getsource(jit.fn))
        code_names = set()
        stack = [jit.fn.__code__]
        while stack:
            code = stack.pop()
            code_names.update(code.co_names)
            stack += [c for c in code.co_consts if inspect.iscode(c)]
        for name in sorted(code_names):
            value = jit.fn.__globals__.get(name)
            if isinstance(value, (JITFunction, InterpretedFunction)):
                visit(value)
            elif type(value).__name__ == "constexpr":
                parts.append(f"{name} = {value.value!r}")

    visit(fn)
    return parts


_DOT = re.compile(r"= (ttng\.warp_group_dot|tt\.dot) .*? : (.*?) \* (.*?) -> (tensor<[^ ]*, (#[\w.]+)(<.*?>)?>)")
_SHAPE = re.compile(r"<(\d+)x(\d+)x(\w+)")
_ALIAS = re.compile(r"^(#[\w]+) = (#[\w.]+)<(.*)>\s*$")
_WARPS = re.compile(r"warpsPerCTA = \[(\d+), (\d+)\]")
_PTXAS = {"registers": r"Used (\d+) registers", "stack": r"(\d+) bytes stack frame",
          "spill_stores": r"(\d+) bytes spill stores", "spill_loads": r"(\d+) bytes spill loads"}
_LOCAL_ARRAY = re.compile(r"\.local \.align \d+ \.b8\s+__local_depot\d+\[(\d+)\]")


def local_memory_in_loops(sass: str) -> dict:
    """Bytes of local-memory stores and loads (``STL`` / ``LDL``: spills, and the local arrays of
    e.g. ``tl.randn``'s sin/cos) in a kernel's SASS (``nvdisasm`` output): in all, and inside a
    loop — between a backward branch and its target, where they run every iteration; outside,
    a program runs them once (ptxas's spill count does not tell the two apart)."""
    lines = []  # (address, instruction) or (None, label)
    for line in sass.splitlines():
        if label := re.match(r"\s*(\.L_x_\d+):", line):
            lines.append((None, label.group(1)))
        elif ins := re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line):
            lines.append((int(ins.group(1), 16), ins.group(2)))
    at = {}  # label -> address of the instruction after it
    for i, (address, text) in enumerate(lines):
        if address is None:
            at[text] = next((a for a, _ in lines[i + 1:] if a is not None), None)
    loops = [(at[m.group(1)], address) for address, text in lines if address is not None
             and (m := re.search(r"\bBRA\b\s*`?\(?(\.L_x_\d+)", text)) and at.get(m.group(1)) is not None
             and at[m.group(1)] <= address]
    out = dict(local_stores=0, local_loads=0, local_stores_in_loops=0, local_loads_in_loops=0)
    for address, text in lines:
        if address is None or not (m := re.search(r"\b(STL|LDL)((?:\.[A-Z0-9]+)*)", text)):
            continue
        size = 16 if ".128" in m.group(2) else 8 if ".64" in m.group(2) else 4
        kind = "local_stores" if m.group(1) == "STL" else "local_loads"
        out[kind] += size
        if any(lo <= address <= hi for lo, hi in loops):
            out[kind + "_in_loops"] += size
    return out


def read_dots(ttgir: str) -> list[dict]:
    """The dots of a TTGIR module: kind ("wgmma", "mma" = mma.sync, "fma"), M, N, K, operand type,
    and for an MMA layout its warps along rows and columns (``warps``, else None)."""
    aliases = {}
    for line in ttgir.splitlines():
        match = _ALIAS.match(line)
        if match:
            aliases[match.group(1)] = (match.group(2), match.group(3))
    dots = []
    for line in ttgir.splitlines():
        match = _DOT.search(line)
        if not match:
            continue
        op, a_type, _, result, encoding, inline = match.groups()
        m, n, _ = _SHAPE.search(result).groups()
        _, k, element = _SHAPE.search(a_type).groups()
        layout, body = aliases.get(encoding, (encoding, inline or ""))
        if op == "ttng.warp_group_dot":
            kind = "wgmma"
        elif "nvidia_mma" in layout:
            kind = "wgmma" if "versionMajor = 3" in body else "mma"
        else:
            kind = "fma"
        warps = _WARPS.search(body)
        dots.append(dict(kind=kind, M=int(m), N=int(n), K=int(k), type=element,
                         warps=[int(w) for w in warps.groups()] if warps and kind != "fma" else None))
    return dots


class _StopAtTTGIR(Exception):
    """Raised by the stage after TTGIR when only the dots are wanted (the rule needs no cubin)."""


class _UntilMMAChoice:
    """Stands for the pass modules (``passes``, ``nvidia``) of Triton's CUDA backend: passes are
    added as usual until ``add_accelerate_matmul`` (the pass that picks each dot's MMA kind: wgmma,
    mma.sync or FMA), none after it — the TTGIR stage then stops there, in a fraction of its time."""

    def __init__(self, target, state: dict):
        self._target, self._state = target, state

    def __getattr__(self, name):
        value = getattr(self._target, name)
        if type(value).__name__ == "module":
            return _UntilMMAChoice(value, self._state)
        if not (callable(value) and name.startswith("add_")):
            return value

        def add(*args, **kwargs):
            if self._state["chosen"]:
                return None
            self._state["chosen"] = name == "add_accelerate_matmul"
            return value(*args, **kwargs)

        return add


def _until_mma_choice(state: dict) -> None:
    """Make Triton's CUDA backend compile up to the MMA choice only (:class:`_UntilMMAChoice`),
    the stage after TTGIR raising :class:`_StopAtTTGIR` with the module's text. Triton 3.6 to 3.9:
    ``add_stages(stages, options, language)``; ``make_ttgir`` adds its passes through the module
    globals ``passes`` and ``nvidia``."""
    from triton.backends.nvidia import compiler

    compiler.passes = _UntilMMAChoice(compiler.passes, state)
    compiler.nvidia = _UntilMMAChoice(compiler.nvidia, state)
    original = compiler.CUDABackend.add_stages

    def add_stages(self, stages, options, *args, **kwargs):
        original(self, stages, options, *args, **kwargs)
        names = list(stages)

        def stop(src, metadata):
            raise _StopAtTTGIR(str(src))

        stages[names[names.index("ttgir") + 1]] = stop

    compiler.CUDABackend.add_stages = add_stages


_MMA_ONLY = {"chosen": False, "installed": False}


def _compile_job(job: dict) -> dict:
    """Compile one signature for sm_90 (runs in a worker): dots, registers, spills, shared memory,
    or with ``job["ttgir_only"]`` the dots alone (compiled up to the MMA choice: well under a
    second where a cubin takes several; a worker so set compiles nothing else)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = job["signature"]
    fn = _kernel(sig["kernel"])
    constexprs = {name: (triton.language.dtype(value) if name in job["dtypes"] else value)
                  for name, value in sig["constexprs"]}
    kinds = {name: kind for name, kind, _ in sig["arguments"]}
    signature, attrs = {}, {}
    for i, param in enumerate(fn.params):
        kind = "constexpr" if param.is_constexpr else kinds[param.name]
        signature[param.name] = kind
    for i, (name, kind, divisible) in enumerate(sig["arguments"]):
        index = [p.name for p in fn.params].index(name)
        if divisible and kind != "constexpr":
            attrs[(index,)] = [["tt.divisibility", 16]]
    options = dict(sig["options"])
    if job.get("fp_fusion") is not None:
        options["enable_fp_fusion"] = job["fp_fusion"]
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # the ptxas log is printed only by a compilation
    if job.get("ttgir_only"):
        if not _MMA_ONLY["installed"]:
            _until_mma_choice(_MMA_ONLY)
            _MMA_ONLY["installed"] = True
        _MMA_ONLY["chosen"] = False
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                      target=GPUTarget("cuda", ARCH, 32), options=options)
    except _StopAtTTGIR as stop:
        return dict(dots=read_dots(str(stop)), seconds=round(time.perf_counter() - start, 1))
    except Exception as exc:  # noqa: BLE001 - a compile failure is a result
        return dict(error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}")
    usage = {key: int(m.group(1)) if (m := re.search(pattern, log.getvalue())) else None
             for key, pattern in _PTXAS.items()}
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([str(nvdisasm), "-c", cubin.name], capture_output=True, text=True, check=True).stdout
    # local arrays the PTX declares (e.g. libdevice's sin/cos argument reduction): ptxas may keep them in registers
    local_arrays = sum(int(n) for n in _LOCAL_ARRAY.findall(compiled.asm["ptx"]))
    return dict(dots=read_dots(compiled.asm["ttgir"]), shared=compiled.metadata.shared,
                num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
                seconds=round(time.perf_counter() - start, 1), **usage, ptx_local_arrays=local_arrays,
                **local_memory_in_loops(sass))


def _job_key(job: dict, triton_version: str) -> str:
    fn = _kernel(job["signature"]["kernel"])
    return hashlib.sha256(json.dumps([triton_version, ARCH, fn.cache_key, job, RESULT_FORMAT], sort_keys=True,
                                     default=str).encode()).hexdigest()


def compile_jobs(jobs: list[dict], workers: int = 2, cache: Path | None = None) -> list[dict]:
    """Compile ``jobs`` (signature dicts) with this process's Triton; results in order, each with
    ``triton`` (the version)."""
    os.environ["TRITON_INTERPRET"] = "0"
    import triton

    if len({bool(job.get("ttgir_only")) for job in jobs}) > 1:
        raise ValueError("compile the TTGIR-only jobs and the others in separate calls")
    results: list[dict | None] = [None] * len(jobs)
    keys = [_job_key(job, triton.__version__) for job in jobs]
    todo = []
    for i, key in enumerate(keys):
        path = cache / f"{key}.json" if cache else None
        if path and path.exists():
            results[i] = json.loads(path.read_text())
        else:
            todo.append(i)
    if todo:
        with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
            for i, result in zip(todo, pool.map(_compile_job, [jobs[i] for i in todo])):
                results[i] = result
                if cache and "error" not in result:
                    cache.mkdir(parents=True, exist_ok=True)
                    (cache / f"{keys[i]}.json").write_text(json.dumps(result))
    for result in results:
        result["triton"] = triton.__version__
    return results


def job_of(signature, ttgir_only: bool = False) -> dict:
    """The JSON job of a :class:`mlit_kernels.meter.LaunchSignature`: dtype constexprs named in
    ``dtypes``; the augmentation kernels compile without FP fusion, as they launch on CUDA."""
    import triton.language as tl

    sig = dataclasses.asdict(signature)
    dtypes = [name for name, value in signature.constexprs
              if isinstance(value, str) and value in {str(d) for d in (tl.float16, tl.bfloat16, tl.float32)}]
    fp_fusion = False if signature.name in ("_crop_kernel", "_op_kernel") else None
    return dict(signature=sig, dtypes=dtypes, fp_fusion=fp_fusion, ttgir_only=ttgir_only)


#: Boolean constexprs that change the dots' operand dtype (kept apart by :func:`rule_representatives`).
DTYPE_FLAGS = ("DOT_F32",)


def calls_dot(fn) -> bool:
    """Whether a JIT kernel's source or a function it calls holds a ``tl.dot``."""
    return any("tl.dot(" in part for part in kernel_sources(fn))


def rule_representatives(recorded: list[Recorded]) -> tuple[list[Recorded], list[str]]:
    """The launches the rule test compiles, and why the others need no compile of their own.

    A kernel without a ``tl.dot`` in its source cannot hold a dot. Triton picks a dot's MMA kind
    from its operand shapes and dtype, the warps and the target — not from the argument
    specialisation; the boolean feature flags (NOISY, DROPOUT, NORM, RECOMPUTE, ...) add or drop
    code and dots around the same tiles. So per (kernel, warps, stages, every non-boolean
    constexpr and DOT_F32) one launch: the one with the most flags set (the most dots)."""
    groups: dict = {}
    skipped = set()
    for rec in recorded:
        sig = rec.signature
        if not calls_dot(_kernel(sig.kernel)):
            skipped.add(sig.name)
            continue
        flags = [name for name, value in sig.constexprs if isinstance(value, bool) and name not in DTYPE_FLAGS]
        key = (sig.kernel, sig.options, tuple((n, v) for n, v in sig.constexprs if n not in flags))
        score = sum(bool(dict(sig.constexprs)[name]) for name in flags)
        if key not in groups or score > groups[key][0]:
            groups[key] = (score, rec)
    reasons = [f"{name}: no tl.dot in its source" for name in sorted(skipped)]
    return [rec for _, rec in groups.values()], reasons


def selected(recorded: list[Recorded], only: list[str]) -> list[Recorded]:
    """The launches ``only`` selects (all when empty): a word names a kernel, KEY=VALUE a constexpr."""
    if not only:
        return recorded

    def hit(rec: Recorded, what: str) -> bool:
        if "=" not in what:
            return rec.signature.name == what
        key, value = what.split("=", 1)
        return str(dict(rec.signature.constexprs).get(key)) == value

    return [r for r in recorded if any(hit(r, w) for w in only)]


def compile_in(env: str | None, jobs: list[dict], workers: int, cache: Path | None) -> list[dict]:
    """Compile ``jobs`` in a child process (the kernels imported without the interpreter) with the
    Python of virtual environment ``env`` (its Triton), or this Python (``env`` None)."""
    python = Path(env) / "bin" / "python" if env else Path(sys.executable)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "jobs.json", Path(tmp) / "results.json"
        src.write_text(json.dumps(jobs))
        cmd = [str(python), str(Path(__file__).resolve()), "--compile-only", str(src), str(dst), "-j", str(workers)]
        if cache:
            cmd += ["--cache", str(cache)]
        environ = {**os.environ, "TRITON_INTERPRET": "0",  # the kernels of mlit, mlit_kernels and bench/
                   "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])}
        subprocess.run(cmd, env=environ, check=True)
        return json.loads(dst.read_text())


# ----------------------------------------------------------------------------------------------
# 3. the rule and the table


def breach(result: dict, kernel: str) -> str | None:
    """Why a compiled launch breaks the sm_90 rule (None when it does not): a wgmma dot with a 16-
    or 32-wide dimension beside other tensor-core dots, its code not cleared on a GPU (:func:`gpu_cleared`)."""
    if "error" in result:
        return f"compile failed: {result['error']}"
    tensor_core = [d for d in result["dots"] if d["kind"] in ("wgmma", "mma")]
    narrow = [d for d in tensor_core if d["kind"] == "wgmma" and {d["M"], d["N"], d["K"]} & set(NARROW)]
    if not narrow or len(tensor_core) < 2:
        return None
    if gpu_cleared(kernel, result["triton"]):
        return None
    d = narrow[0]
    return f"wgmma {d['M']}x{d['N']}x{d['K']} beside {len(tensor_core) - 1} other tensor-core dot(s)"


def warps_on_thin_rows(result: dict) -> list[str]:
    """The mma.sync dots of a compiled launch whose warps stand along more rows than the tile has
    (warps along M × 16 > M) while its columns could hold every warp (N ≥ 8 × warps): each warp
    then holds the whole row tile, e.g. 16 × 128 at [8, 1] keeps 64 fp32 a thread where [1, 8]
    keeps 8. Triton gives a chain of dots the layout of its last (see
    :mod:`mlit_kernels.common.tiling`)."""
    found = []
    for d in result.get("dots", []):
        if d["kind"] == "mma" and d.get("warps"):
            along_m, along_n = d["warps"]
            if along_m * 16 > d["M"] and d["N"] >= 8 * along_m * along_n:
                found.append(f"{d['M']}x{d['N']}x{d['K']} at warps {d['warps']}")
    return found


def dot_summary(dots: list[dict]) -> str:
    """e.g. "wgmma 128x16x32 ×2, mma 16x16x32 ×3, fma ×4"."""
    counts: dict[str, int] = {}
    for d in dots:
        key = d["kind"] if d["kind"] == "fma" else f"{d['kind']} {d['M']}x{d['N']}x{d['K']}"
        counts[key] = counts.get(key, 0) + 1
    order = sorted(counts, key=lambda k: (("wgmma", "mma", "fma").index(k.split()[0]), k))
    return ", ".join(f"{k} ×{counts[k]}" if counts[k] > 1 else k for k in order) or "none"


_KEY_CONSTEXPRS = ("K", "M0", "M1", "M2", "M3", "G0", "G1", "G2", "G3", "DC", "WD", "BLOCK_N", "BR", "ROWS",
                   "BLOCK_M", "BLOCK_E", "D_PAD", "HD_PAD", "BLOCK_T", "NORM", "NOISY", "DROPOUT", "RECOMPUTE",
                   "SEP_V", "DTYPE")


def config_label(signature: dict) -> str:
    values = dict(signature["constexprs"])
    shown = [f"{k}={values[k]}" for k in _KEY_CONSTEXPRS if k in values and values[k] not in (0, None)]
    return " ".join(shown)


def in_loops(result: dict) -> int:
    """Bytes of local-memory stores and loads inside loops (:func:`local_memory_in_loops`)."""
    return (result.get("local_stores_in_loops") or 0) + (result.get("local_loads_in_loops") or 0)


def _usage(result: dict) -> str:
    """"registers/spill bytes/in-loop local bytes/shared KB" of a compiled launch ("-" for a
    TTGIR-only one)."""
    if "shared" not in result:
        return "-"
    return f"{result['registers']}/{result.get('spill_stores') or 0}/{in_loops(result)}/{result['shared'] / 1024:.1f}"


REGISTER_CEILING = 255  # registers a thread may hold on sm_90 (at 8 warps or fewer)


class Spill(NamedTuple):
    """A launch that spills: kernel, Triton version, spill-store bytes, whether a default
    configuration launched it, its constexprs, local-memory bytes inside loops, registers a
    thread. Below REGISTER_CEILING ptxas chose to spill rather than take more registers (at
    ``maxnreg=255`` every such default launch of Triton 3.9.0 compiles without spills, at more
    registers and so fewer programs an SM)."""

    kernel: str
    triton: str
    stores: int
    default: bool
    label: str
    in_loops: int
    registers: int


def table(recorded: list[Recorded], results: dict[str, list[dict]], markdown: bool = True
          ) -> tuple[str, int, list[Spill]]:
    """The audit table (one row per launch, each Triton version's dots / regs / spills / shared
    memory), the number of breaches, and the spilling launches."""
    versions = list(results)
    head = ["kernel", "launched by", "warps/stages", "constexprs"]
    for v in versions:
        head += [f"dots ({v})", f"regs/spill B/in loops B/shared KB ({v})", f"rule ({v})"]
    lines, breaches, spills = [], 0, []
    for i, rec in enumerate(recorded):
        sig = dataclasses.asdict(rec.signature)
        origins = sorted(rec.origins)
        who = (origins[0] + (f" +{len(origins) - 1}" if len(origins) > 1 else "")) + (" (default)" if rec.default else "")
        row = [rec.signature.name, who, f"{rec.signature.num_warps or 4}/{rec.signature.num_stages or 3}",
               config_label(sig)]
        for v in versions:
            result = results[v][i]
            why = breach(result, rec.signature.name)
            breaches += why is not None
            if "error" in result:
                row += ["-", "-", why]
                continue
            spill = result.get("spill_stores") or 0
            if spill:
                spills.append(Spill(rec.signature.name, v, spill, rec.default, config_label(sig), in_loops(result),
                                    result["registers"]))
            row += [dot_summary(result["dots"]),
                    _usage(result), "BREACH: " + why if why else "ok"]
        lines.append(row)
    if markdown:
        text = "\n".join(["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
                         + ["| " + " | ".join(line) + " |" for line in lines])
    else:
        text = "\n".join("  ".join(line) for line in [head] + lines)
    return text, breaches, spills


def summary(recorded: list[Recorded], results: dict[str, list[dict]]) -> str:
    """Per kernel and Triton version: launches audited, MMA kinds, worst registers / spills."""
    lines = ["| kernel | Triton | launches | wgmma dots (M×N×K) | mma.sync | max regs | spill B (default / any) | "
             "in loops B (default / any) | max shared KB | rule |", "|" + " --- |" * 10]
    names = sorted({r.signature.name for r in recorded})
    for v, res in results.items():
        for name in names:
            rows = [(rec, r) for rec, r in zip(recorded, res) if rec.signature.name == name and "error" not in r]
            if not rows:
                continue
            wg = sorted({f"{d['M']}x{d['N']}x{d['K']}" for _, r in rows for d in r["dots"] if d["kind"] == "wgmma"})
            mma = sum(any(d["kind"] == "mma" for d in r["dots"]) for _, r in rows)
            default_spill = max([r.get("spill_stores") or 0 for rec, r in rows if rec.default] or [0])
            any_spill = max(r.get("spill_stores") or 0 for _, r in rows)
            default_loops = max([in_loops(r) for rec, r in rows if rec.default] or [0])
            any_loops = max(in_loops(r) for _, r in rows)
            bad = sum(breach(r, name) is not None for _, r in rows)
            lines.append(f"| {name} | {v} | {len(rows)} | {', '.join(wg) or '-'} | {mma} of {len(rows)} | "
                         f"{max(r.get('registers') or 0 for _, r in rows) or '-'} | {default_spill} / {any_spill} | "
                         f"{default_loops} / {any_loops} | "
                         f"{max(r.get('shared', 0) for _, r in rows) / 1024:.1f} | "
                         f"{'ok' if not bad else f'{bad} breach(es)'} |")
    return "\n".join(lines)


def main() -> int:
    from mlit_kernels.common.clearance import BUILTIN

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--triton-env", action="append", default=[], metavar="PATH",
                        help="also compile with the Triton of this virtual environment (repeatable)")
    parser.add_argument("--no-local", action="store_true", help="do not compile with this process's Triton")
    parser.add_argument("--markdown", metavar="OUT", help="write the markdown report here")
    parser.add_argument("--quick", action="store_true", help="default configurations only, small batches")
    parser.add_argument("--rule-only", action="store_true",
                        help="compile up to the MMA choice only: the dots and the rule, no registers / spills")
    parser.add_argument("--only", action="append", default=[], metavar="KERNEL|KEY=VALUE",
                        help="audit only these launches: a kernel name or a constexpr value (repeatable: any)")
    parser.add_argument("-j", type=int, default=max(1, min(2, os.cpu_count() or 1)), help="compile workers")
    parser.add_argument("--cache", type=Path, default=CACHE,
                        help=f"results cache (by Triton version, kernel source and signature; default {CACHE})")
    parser.add_argument("--compile-only", nargs=2, metavar=("JOBS", "RESULTS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.compile_only:
        jobs = json.loads(Path(args.compile_only[0]).read_text())
        Path(args.compile_only[1]).write_text(json.dumps(compile_jobs(jobs, args.j, args.cache)))
        return 0
    start = time.perf_counter()
    recorded = selected(record(quick=args.quick), args.only)
    kernels = sorted({r.signature.name for r in recorded})
    print(f"recorded {len(recorded)} distinct launches of {len(kernels)} kernels in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    jobs = [job_of(r.signature, ttgir_only=args.rule_only) for r in recorded]
    results = {}
    envs = ([] if args.no_local else [None]) + args.triton_env
    for env in envs:
        start = time.perf_counter()
        res = compile_in(env, jobs, args.j, args.cache)
        version = res[0]["triton"] if res else "?"
        results[version] = res
        print(f"compiled with Triton {version} in {time.perf_counter() - start:.0f} s", flush=True)
    text, breaches, spills = table(recorded, results, markdown=True)
    report = ["# sm_90 audit of the launched kernels", "",
              f"`python bench/sm90_audit.py{' --quick' if args.quick else ''}{' --rule-only' if args.rule_only else ''}"
              + "".join(f" --only {w}" for w in args.only)
              + "".join(f" --triton-env {e}" for e in args.triton_env) + "` — target sm_90 "
              f"(`GPUTarget(\"cuda\", 90, 32)`, Triton's bundled ptxas), Triton {', '.join(results)}; "
              f"{len(recorded)} distinct launches of {len(kernels)} kernels: the training and evaluation steps of "
              f"{', '.join(c[0] for c in STEP_CASES)} at the recipes' batches (both MoE variants), the MoE layer at "
              f"{', '.join(c[0] for c in LAYER_CASES)}; every tuning candidate. Rule: no wgmma dot with a 16- or 32-wide "
              f"dimension beside other tensor-core dots (unless its family's code was cleared on a GPU: "
              f"{sum(v.cleared for v in BUILTIN)} built-in verdict(s)). "
              f"Breaches: {breaches}. Spilling launches: {len(spills)} "
              f"({sum(s.default for s in spills)} of them in a default configuration); launches with local-memory "
              f"stores or loads inside a loop: {sum(in_loops(r) > 0 for res in results.values() for r in res)} "
              f"({sum(rec.default and in_loops(r) > 0 for res in results.values() for rec, r in zip(recorded, res))} "
              f"default); below the {REGISTER_CEILING}-register "
              f"ceiling (ptxas chose them over more registers): {sum(s.registers < REGISTER_CEILING for s in spills)} "
              f"({sum(s.default and s.registers < REGISTER_CEILING for s in spills)} default). "
              "\"In loops\": bytes of the "
              f"local-memory stores and loads (spills, local arrays) between a backward branch and its target "
              f"in the SASS (nvdisasm), run every iteration; the others run once a program. Launches whose PTX "
              f"declares a local array (e.g. libdevice's sin/cos argument reduction): "
              f"{sum(bool(r.get('ptx_local_arrays')) for res in results.values() for r in res)}.", "",
              "## Per kernel", "", summary(recorded, results), "", "## Spills at the launched settings", ""]
    report += [f"- {s.kernel} (Triton {s.triton}): {s.stores} B spill stores at {s.registers} registers, "
               f"{s.in_loops} B of local memory in loops"
               f"{' — DEFAULT configuration' if s.default else ''} ({s.label})" for s in spills] or ["none"]
    report += ["", "## Every launch", "", text, ""]
    output = "\n".join(report)
    print(output)
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(output)
    return 1 if breaches or any(s.default for s in spills) else 0


if __name__ == "__main__":
    sys.exit(main())
