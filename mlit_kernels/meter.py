"""Count what a piece of PyTorch / Triton code would cost a GPU, on any device: kernel launches,
host syncs and modeled HBM bytes.

At the paper's sizes a kernel launch (3-5 µs) costs as much as an MoE layer's math, so the design
is driven by counts that need no GPU: run the code under :class:`Meter` (on the CPU, with
``TRITON_INTERPRET=1`` for the Triton kernels) and read

* ``launches``: every Triton kernel launch plus every aten op that launches a device kernel
  (views, allocations and metadata ops apart);
* ``syncs``: host syncs and host-side scalar reads (``.item()``, ``nonzero``, boolean masking,
  ``torch.equal``, device-to-host copies, ...): each one stalls a GPU pipeline and bars CUDA-graph
  capture;
* ``bytes``: modeled HBM traffic: for each launch, every distinct tensor it reads or writes, once
  (the traffic of a kernel that streams its operands through the caches once);
* ``flops``: the matmul work of each launch (2 per multiply-add): aten matmuls and convolutions by
  torch's own formulas (``torch.utils.flop_counter``), SDPA forward and backward (the backward
  recomputing the scores, as flash attention does), and the Triton kernels of
  their family's FLOP models (:func:`mlit_kernels.registry.kernel_flops`); element-wise work is left out (it is bound by bytes);
* ``seconds(H100)``: a roofline per launch, max(launch cost, bytes / bandwidth, flops / peak),
  summed (:class:`DeviceModel`).

Sections (``with meter.section("moe"):``) attribute what runs inside them to a named part.
``dry_run=True`` records Triton launches without running them (their outputs stay
uninitialised): counts at the paper's sizes in seconds, even through the interpreter.
Each Triton launch also keeps its :class:`LaunchSignature` (``Launch.signature``): the kernel,
its constexprs, warps, stages and how Triton's JIT specialises its other arguments — what a GPU
would compile (``bench/sm90_audit.py`` compiles exactly those for sm_90).

    with Meter(dry_run=True) as meter:
        y, aux = layer(x)
        torch.autograd.backward((y, aux), (dy, torch.ones(())))
    print(meter.table())
"""

from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .common.device_model import H100, DeviceModel
from .common.tiling import padding, round_up
from .registry import kernel_flops

aten = torch.ops.aten

# aten ops that launch no kernel: allocations and metadata (views are recognised by their schema).
_FREE = {
    aten.empty.memory_format, aten.empty_strided.default, aten.new_empty.default,
    aten.new_empty_strided.default, aten.empty_like.default, aten._unsafe_view.default,
    aten.lift_fresh.default, aten.detach.default, aten.set_.source_Storage_storage_offset,
    aten.resize_.default, aten.is_same_size.default, aten.record_stream.default,
}
# aten ops that read a device value on the host (a sync), whatever else they do.
_SYNC = {
    aten._local_scalar_dense.default, aten.item.default, aten.nonzero.default, aten.masked_select.default,
    aten.equal.default, aten.is_nonzero.default, aten.allclose.default, aten._unique2.default,
    aten.unique_dim.default, aten.unique_consecutive.default, aten.bincount.default,
    aten.repeat_interleave.Tensor, aten.index.Tensor,  # index: only with a boolean mask (checked below)
}


#: torch dtypes as Triton's signatures name them (pointer arguments: "*" + this).
TRITON_TYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                     torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
                     torch.bool: "i1"}


@dataclass(frozen=True)
class LaunchSignature:
    """What a Triton launch compiles: ``kernel`` "module:function"; ``constexprs`` the constexpr
    parameters' values ((name, value) pairs; a ``tl.dtype`` as its name, e.g. "fp16");
    ``arguments`` the other parameters as Triton's JIT specialises them, (name, type, divisible):
    type "*fp16"-style for a tensor, "i32" / "i64" / "fp32" / "u1" for a scalar, or "constexpr"
    for an integer equal to 1 and for None (then the value is in ``constexprs``); ``divisible``
    a tensor whose address, or an integer whose value, is a multiple of 16; ``options`` the
    launch options passed ((name, value) pairs: ``num_warps``, ``num_stages``, ...; one not
    passed takes the backend's default: 4 warps and 3 stages on CUDA)."""

    kernel: str
    constexprs: tuple
    arguments: tuple
    options: tuple

    @property
    def name(self) -> str:
        return self.kernel.rsplit(":", 1)[1]

    @property
    def num_warps(self) -> int | None:
        return dict(self.options).get("num_warps")

    @property
    def num_stages(self) -> int | None:
        return dict(self.options).get("num_stages")


def _argument_type(value) -> tuple[str, bool]:
    """(type, divisible by 16) of a non-constexpr kernel argument, by the rule of Triton's JIT
    (``specialize_impl``): an integer 1 becomes a constexpr, an integer or an address that is a
    multiple of 16 carries ``tt.divisibility = 16``; floats and booleans are not specialised."""
    if value is None:
        return "constexpr", False
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        kind = "i32" if -2**31 <= value < 2**31 else "i64" if -2**63 <= value < 2**63 else "u64"
        return kind, value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    if isinstance(value, torch.Tensor):
        return "*" + TRITON_TYPE_NAMES[value.dtype], value.data_ptr() % 16 == 0
    raise TypeError(f"unsupported Triton kernel argument {type(value).__name__}")


def _constexpr_value(value):
    """A constexpr as the signature keeps it (a ``tl.dtype`` by its name)."""
    value = getattr(value, "value", value)  # a tl.constexpr wrapper
    if type(value).__name__ == "dtype" and hasattr(value, "primitive_bitwidth"):
        return str(value)
    return value


def launch_signature(fn, args, kwargs) -> LaunchSignature:
    """The :class:`LaunchSignature` of launching Triton kernel ``fn`` (a JIT or interpreted
    function) with ``args`` / ``kwargs``."""
    python_fn = getattr(fn, "fn", fn)
    parameters = inspect.signature(python_fn).parameters
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in parameters))
    bound = inspect.signature(python_fn).bind_partial(*args, **{k: v for k, v in kwargs.items() if k in parameters})
    bound.apply_defaults()
    constexprs, arguments = [], []
    for name, param in parameters.items():
        value = bound.arguments[name]
        if "constexpr" in str(param.annotation):
            constexprs.append((name, _constexpr_value(value)))
            continue
        kind, divisible = _argument_type(value)
        if kind == "constexpr":
            constexprs.append((name, value))
        arguments.append((name, kind, divisible))
    return LaunchSignature(f"{python_fn.__module__}:{python_fn.__name__}", tuple(constexprs), tuple(arguments),
                           options)


@dataclass
class Launch:
    """One recorded kernel: ``kind`` is "triton" or "aten"; ``bytes`` the modeled HBM traffic;
    ``flops`` its matmul work (0 for element-wise kernels and unmodelled Triton kernels);
    ``signature`` what a Triton launch compiles (None for aten)."""

    kind: str
    name: str
    bytes: int
    section: str
    meta: dict = field(default_factory=dict)
    flops: int = 0
    signature: LaunchSignature | None = None


def _tensors(*trees) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(trees)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _distinct_bytes(tensors) -> int:
    """Bytes of the distinct tensors (an in-place output and its input count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t.device.type == "meta":
            continue
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _writes(func) -> bool:
    """True for an op that writes one of its arguments in place (``_foreach_add_``,
    ``_fused_adamw_``, ...): a kernel even when it returns nothing."""
    return any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)


def _is_sync(func, args, out) -> bool:
    if func not in _SYNC and func not in (aten._to_copy.default, aten.copy_.default):
        return False
    if func is aten.index.Tensor:  # a boolean mask index has a data-dependent shape
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
    if func in (aten._to_copy.default, aten.copy_.default):  # device → host copy
        src = args[1] if func is aten.copy_.default else args[0]
        dst = args[0] if func is aten.copy_.default else out
        return src.device.type != "cpu" and dst.device.type == "cpu"
    return True


def _sdpa_flops(func, args) -> int:
    """SDPA: q (B, H, L, E), k (B, H_kv, S, E), v (B, H_kv, S, E_v) — GQA heads share k and v.
    Forward q kᵀ and p v: 2·B·H·L·S·(E + E_v); backward (grad_out first) recomputes q kᵀ and
    computes dv, dp, dq, dk: 2·B·H·L·S·(3E + 2E_v)."""
    backward = func.overloadpacket.__name__.endswith("_backward")
    q, k, v = args[1:4] if backward else args[:3]
    b, h, seq_q, e = q.shape
    seq_k, e_v = k.shape[-2], v.shape[-1]
    pairs = b * h * seq_q * seq_k
    return 2 * pairs * (3 * e + 2 * e_v) if backward else 2 * pairs * (e + e_v)


def _aten_flops(func, args, kwargs, out) -> int:
    """Matmul FLOPs of one aten op (0 for the others)."""
    from torch.utils.flop_counter import flop_registry

    formula = flop_registry.get(func.overloadpacket)
    if formula is not None:
        return int(formula(*args, **kwargs, out_val=out))
    if "scaled_dot_product" in func.overloadpacket.__name__:
        return _sdpa_flops(func, args)
    return 0


def _kernel_arguments(fn, args, kwargs) -> dict:
    """A Triton launch's arguments by parameter name."""
    python_fn = getattr(fn, "fn", fn)
    names = list(inspect.signature(python_fn).parameters)
    return {**dict(zip(names, args)), **kwargs}


def _is_weight(t: torch.Tensor) -> bool:
    """A parameter, or a tensor made straight from parameters (an autocast cast of a weight)."""
    if t.grad_fn is None:
        return isinstance(t, torch.nn.Parameter)
    nexts = [fn for fn, _ in t.grad_fn.next_functions if fn is not None]
    return bool(nexts) and all(isinstance(getattr(fn, "variable", None), torch.nn.Parameter) for fn in nexts)


class saved_for_backward(contextlib.AbstractContextManager):
    """``with saved_for_backward() as saved:`` records what autograd saves for the backward of
    the code inside; ``saved.bytes``: the distinct storages of the saved activations (parameters
    and the casts made straight from them apart: they are weights, not activations)."""

    def __init__(self):
        self._storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def bytes(self) -> int:
        return sum(self._storages.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta" and not _is_weight(t):
            storage = t.untyped_storage()
            self._storages[storage.data_ptr()] = storage.nbytes()
        return t

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


class Meter(TorchDispatchMode):
    """Counts launches, syncs and modeled bytes of everything run inside ``with Meter():``.

    Sees every aten op the dispatcher runs (autograd's backward included) and, by wrapping
    Triton's launch entry points while active, every Triton kernel launch. Ops of the ``mlit``
    custom-op namespace are opened up: their implementation runs under the meter, so the kernels
    and aten ops inside them are what is counted.
    """

    def __init__(self, dry_run: bool = False):
        super().__init__()
        self.dry_run = dry_run
        self.records: list[Launch] = []
        self.sync_ops: list[tuple[str, str]] = []
        self._sections = ["-"]
        self._patches: list[tuple[Any, Any]] = []
        self._depth = 0
        self._in_triton = 0  # >0 while a Triton kernel runs (the interpreter's own torch ops are not counted)

    # ------------------------------------------------------------------ results

    @property
    def launches(self) -> int:
        return len(self.records)

    @property
    def triton_launches(self) -> int:
        return sum(r.kind == "triton" for r in self.records)

    @property
    def aten_launches(self) -> int:
        return sum(r.kind == "aten" for r in self.records)

    @property
    def syncs(self) -> int:
        return len(self.sync_ops)

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.records)

    @property
    def flops(self) -> int:
        return sum(r.flops for r in self.records)

    def seconds(self, device: DeviceModel = H100, captured: bool = True) -> float:
        """The modelled time of everything recorded on ``device`` (:class:`DeviceModel`)."""
        return device.seconds(self.records, captured)

    def unmodelled(self) -> set[str]:
        """Triton kernels launched whose matmul work no formula models (counted as 0 FLOPs)."""
        return {r.name for r in self.records if r.kind == "triton"
                and r.name.removeprefix("triton.") not in kernel_flops()}

    def by_name(self) -> Counter:
        return Counter(r.name for r in self.records)

    def by_section(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self.records:
            row = out.setdefault(r.section, {"launches": 0, "syncs": 0, "bytes": 0})
            row["launches"] += 1
            row["bytes"] += r.bytes
        for section, _ in self.sync_ops:
            out.setdefault(section, {"launches": 0, "syncs": 0, "bytes": 0})["syncs"] += 1
        return out

    def table(self) -> str:
        lines = [f"{'kernel':<48} {'launches':>8} {'MB':>10}"]
        mb: Counter = Counter()
        for r in self.records:
            mb[r.name] += r.bytes
        for name, n in self.by_name().most_common():
            lines.append(f"{name:<48} {n:>8} {mb[name] / 1e6:>10.2f}")
        lines.append(f"{'total (' + str(self.syncs) + ' syncs)':<48} {self.launches:>8} {self.bytes / 1e6:>10.2f}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ sections

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        """Attribute the launches and syncs inside to ``name``."""
        self.push_section(name)
        try:
            yield
        finally:
            self.pop_section()

    def push_section(self, name: str) -> None:
        self._sections.append(name)

    def pop_section(self) -> None:
        if len(self._sections) > 1:
            self._sections.pop()

    # ------------------------------------------------------------------ recording

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._in_triton:
            return func(*args, **kwargs)
        if func.namespace == "mlit":  # run the custom op's body under the meter: count its insides
            from torch._library.custom_ops import _maybe_get_opdef

            opdef = _maybe_get_opdef(func)
            if opdef is not None:
                with self:
                    return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        outputs = _tensors(out)
        if _is_sync(func, args, out):
            self.sync_ops.append((self._sections[-1], str(func.overloadpacket.__name__)))
        if (not outputs and not _writes(func)) or func.is_view or func in _FREE or (func in _SYNC
                                                                               and func is not aten.index.Tensor):
            return out  # metadata (no tensor made or written), a view, an allocation, or a sync counted above
        if func in (aten._to_copy.default, aten.copy_.default) and _is_sync(func, args, out):
            return out  # counted as a sync; the copy itself is part of it
        name = f"aten.{func.overloadpacket.__name__}"
        self.records.append(Launch("aten", name, _distinct_bytes(_tensors(args, kwargs, out)), self._sections[-1],
                                   flops=_aten_flops(func, args, kwargs, out)))
        return out

    def _record_triton(self, fn, args, grid, kwargs) -> None:
        meta = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
        name = getattr(getattr(fn, "fn", None), "__name__", None) or getattr(fn, "__name__", "triton_kernel")
        flops = kernel_flops().get(name)
        launch = Launch("triton", f"triton.{name}", _distinct_bytes(_tensors(args, kwargs)), self._sections[-1], meta,
                        0 if flops is None else int(flops(_kernel_arguments(fn, args, kwargs))),
                        launch_signature(fn, args, kwargs))
        launch.meta["grid"] = grid
        self.records.append(launch)

    def __enter__(self):
        self._depth += 1
        if self._depth == 1:
            self._patch_triton()
        return super().__enter__()

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for cls, original in reversed(self._patches):
                cls.run = original
            self._patches.clear()
        return super().__exit__(*exc)

    def _patch_triton(self) -> None:
        """Wrap the launch entry of compiled and interpreted Triton kernels (autotuned ones too)."""
        from triton.runtime import interpreter, jit

        meter = self
        for cls in (jit.JITFunction, interpreter.InterpretedFunction):
            original = cls.run

            def run(fn_self, *args, grid, warmup, _original=original, **kwargs):
                if not warmup:
                    meter._record_triton(fn_self, args, grid, kwargs)
                    if meter.dry_run:
                        return None
                meter._in_triton += 1
                try:
                    return _original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
                finally:
                    meter._in_triton -= 1

            self._patches.append((cls, original))
            cls.run = run


__all__ = ["Meter", "Launch", "LaunchSignature", "launch_signature", "DeviceModel", "H100", "saved_for_backward"]


# ------------------------------------------------------------------------------------------------
# one MoE layer's costs at a shape


@dataclass
class LayerCosts:
    """What one call of an MoE layer costs: ``launches`` / ``syncs`` / ``bytes`` of a training
    forward + backward and ``*_eval`` of an evaluation forward; ``min_bytes*`` the traffic no
    implementation can avoid (inputs read once, outputs written once, in their dtypes);
    ``padding_m`` / ``padding_d_h`` the largest fraction of padded columns any Triton launch
    computed (0 when none ran); ``kernels`` the training launches by name."""

    launches: int
    syncs: int
    bytes: int
    min_bytes: int
    launches_eval: int
    syncs_eval: int
    bytes_eval: int
    min_bytes_eval: int
    padding_m: float
    padding_d_h: float
    kernels: dict


def _padding(records: list[Launch], m: int, d_h: int) -> tuple[float, float]:
    """The largest padded fraction of m and of d_h over the Triton launches (from their tile constexprs)."""
    pad_m = pad_d = 0.0
    for r in records:
        if r.kind != "triton":
            continue
        if r.meta.get("M0"):
            pad_m = max(pad_m, padding(m, sum(r.meta.get(f"M{i}", 0) for i in range(4))))
        if r.meta.get("BLOCK_MO"):
            pad_m = max(pad_m, padding(m, r.meta["BLOCK_MO"]))
        dc = r.meta.get("DC") or r.meta.get("BLOCK_DC")
        if dc:
            pad_d = max(pad_d, padding(d_h, round_up(d_h, dc)))
    return pad_m, pad_d


def measure_layer(layer, n_tokens: int, *, autocast_dtype: torch.dtype | None = torch.float16,
                  dry_run: bool = True) -> LayerCosts:
    """Count one training forward + backward and one evaluation forward of ``layer`` (an
    :class:`mlit_kernels.SharedSwiGLUMoE`) on ``n_tokens`` fp32 tokens under autocast, as a
    mixed-precision training loop runs it (x fp32 from a LayerNorm, fp32 master weights,
    gradients set to None before). ``dry_run`` records the Triton launches without running them."""
    device = layer.w_gate.device
    x = torch.randn(n_tokens, layer.dim, device=device, requires_grad=True)
    dy = torch.randn(n_tokens, layer.dim, device=device)  # y comes out in x's dtype (both backends)
    d_aux = torch.ones((), device=device)
    param_bytes = sum(p.numel() * p.element_size() for p in layer.parameters())
    x_bytes = x.numel() * x.element_size()
    y_bytes = dy.numel() * dy.element_size()
    autocast = torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
    was_training = layer.training
    layer.eval()
    with torch.no_grad(), Meter(dry_run=dry_run) as evaluation, autocast:
        layer(x)
    layer.train().zero_grad(set_to_none=True)
    with Meter(dry_run=dry_run) as training:
        with autocast:
            y, aux = layer(x)
        torch.autograd.backward((y, aux), (dy, d_aux))
    layer.train(was_training).zero_grad(set_to_none=True)
    pad_m, pad_d = _padding(evaluation.records + training.records, layer.dim, layer.hidden_dim)
    forward_min = x_bytes + param_bytes + y_bytes  # read x and the weights, write y
    backward_min = y_bytes + x_bytes + param_bytes + x_bytes + param_bytes  # read dy, x, weights; write dx, grads
    return LayerCosts(
        launches=training.launches, syncs=training.syncs, bytes=training.bytes, min_bytes=forward_min + backward_min,
        launches_eval=evaluation.launches, syncs_eval=evaluation.syncs, bytes_eval=evaluation.bytes,
        min_bytes_eval=forward_min, padding_m=pad_m, padding_d_h=pad_d, kernels=dict(training.by_name()))


__all__ += ["LayerCosts", "measure_layer"]
