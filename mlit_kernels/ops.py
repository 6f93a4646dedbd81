"""The Triton MoE stages as ``torch.library`` custom ops, so ``torch.compile`` traces the layer.

Four opaque ops (namespace ``mlit``), each with a fake (meta) implementation giving exact output
shapes and dtypes, and autograd registered with :func:`torch.library.register_autograd`:

* ``mlit::gate_fwd(x, w_gate, w_noise, noise?, seed, k, training, noise_eps)
  -> (topk_gate (N, k) fp32, importance (t,) fp32, load (t,) fp32, topk_idx (N, k) int32)``
  (the integer output last: torch's opcheck sums the outputs in order)
* ``mlit::gate_bwd(...) -> (dx (N, m) x.dtype, dw_gate (m, t), dw_noise (m, t))``
* ``mlit::experts_fwd(x, topk_idx, topk_gate, w1, b1, v, b_v, w2, b2, variant, save)
  -> (y (N, m), a, u, sorted_pairs, expert_offsets)``: with ``save`` the tensors backward needs
  are outputs of static shape, a (N·k, d_h), u (N, d_h), sorted_pairs (N·k,) int32,
  expert_offsets (t + 1,) int32 (the per-expert groups have data-dependent sizes, but they are
  described by these fixed-size tensors); without ``save`` those four are empty.
* ``mlit::experts_bwd(dy, x, topk_idx, topk_gate, w1, v, w2, a, u, sorted_pairs, expert_offsets)
  -> (dx, d_topk_gate fp32, dw1, db1, dv, db_v, dw2, db2)``.

Everything dynamic happens in the real kernel call, never while tracing: the gate seed is an op
input (a 0-d int64 tensor drawn outside the op, read with ``int()`` inside); ``variant`` is a
static string argument and ``"auto"`` is resolved by :func:`mlit_kernels.functions.choose_variant`
inside the op (its CUDA timing and Triton's autotuning run on the first real call); the fake
implementations launch nothing. With ``save`` the dense variant computes the routing its
backward needs in the forward (as an output).

Limitations: no double backward (the backward ops have no autograd); the seed tensor lives on the
CPU (no host sync to read it; under inductor it is drawn by inductor's RNG, reproducible with
``torch.manual_seed`` but not the eager draws unless ``torch._inductor.config.fallback_random``),
which also keeps inductor's CUDA graphs (mode="reduce-overhead") off for the graph.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .dispatch import Routing, route
from .gate import gate_backward, gate_forward
from .swiglu import experts_backward, experts_forward


def _seed_int(seed: Tensor) -> int:
    return int(seed.reshape(()).item())


# --------------------------------------------------------------------------------------- gate


@torch.library.custom_op("mlit::gate_fwd", mutates_args=())
def gate_fwd(x: Tensor, w_gate: Tensor, w_noise: Tensor, noise: Optional[Tensor], seed: Tensor, k: int,
             training: bool, noise_eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fused noisy top-k gate (see :func:`mlit_kernels.gate.gate_forward`)."""
    noise = None if noise is None else noise.contiguous()
    idx, gate, importance, load = gate_forward(x.contiguous(), w_gate.contiguous(), w_noise.contiguous(), k, training,
                                               noise, _seed_int(seed), noise_eps)
    return gate, importance, load, idx


@gate_fwd.register_fake
def _gate_fwd_fake(x, w_gate, w_noise, noise, seed, k, training, noise_eps):
    n, t = x.shape[0], w_gate.shape[1]
    return (x.new_empty((n, k), dtype=torch.float32), x.new_empty((t,), dtype=torch.float32),
            x.new_empty((t,), dtype=torch.float32), x.new_empty((n, k), dtype=torch.int32))


@torch.library.custom_op("mlit::gate_bwd", mutates_args=())
def gate_bwd(x: Tensor, w_gate: Tensor, w_noise: Tensor, noise: Optional[Tensor], seed: Tensor, k: int,
             training: bool, noise_eps: float, d_gate: Tensor, d_importance: Tensor,
             d_load: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`gate_fwd` w.r.t. x (in x's dtype), w_gate and w_noise."""
    noise = None if noise is None else noise.contiguous()
    dx, dwg, dwn = gate_backward(x.contiguous(), w_gate.contiguous(), w_noise.contiguous(), k, training, noise,
                                 _seed_int(seed), noise_eps, d_gate, d_importance, d_load)
    return dx.to(x.dtype), dwg.to(w_gate.dtype), dwn.to(w_noise.dtype)


@gate_bwd.register_fake
def _gate_bwd_fake(x, w_gate, w_noise, noise, seed, k, training, noise_eps, d_gate, d_importance, d_load):
    return torch.empty_like(x), torch.empty_like(w_gate), torch.empty_like(w_noise)


def _gate_setup_context(ctx, inputs, output):
    x, w_gate, w_noise, noise, seed, k, training, noise_eps = inputs
    ctx.save_for_backward(x, w_gate, w_noise, noise, seed)
    ctx.k, ctx.training, ctx.noise_eps = k, training, noise_eps
    ctx.load_has_grad = bool(training and k < w_gate.shape[1])


def _gate_backward(ctx, d_gate, d_importance, d_load, _d_idx):
    x, w_gate, w_noise, noise, seed = ctx.saved_tensors
    n, t = x.shape[0], w_gate.shape[1]
    d_gate = x.new_zeros((n, ctx.k), dtype=torch.float32) if d_gate is None else d_gate
    d_importance = x.new_zeros((t,), dtype=torch.float32) if d_importance is None else d_importance
    if d_load is None or not ctx.load_has_grad:  # the load is then the routing counts: no gradient
        d_load = x.new_zeros((t,), dtype=torch.float32)
    dx, dwg, dwn = gate_bwd(x, w_gate, w_noise, noise, seed, ctx.k, ctx.training, ctx.noise_eps,
                            d_gate.float().contiguous(), d_importance.float().contiguous(),
                            d_load.float().contiguous())
    return dx, dwg, dwn, None, None, None, None, None


gate_fwd.register_autograd(_gate_backward, setup_context=_gate_setup_context)


# ------------------------------------------------------------------------------------ experts


@torch.library.custom_op("mlit::experts_fwd", mutates_args=())
def experts_fwd(x: Tensor, topk_idx: Tensor, topk_gate: Tensor, w1: Tensor, b1: Tensor, v: Tensor, b_v: Tensor,
                w2: Tensor, b2: Tensor, variant: str, save: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """y of the shared-V/W2 SwiGLU experts, plus (a, u, sorted_pairs, expert_offsets) when ``save``."""
    x, topk_idx, topk_gate = x.contiguous(), topk_idx.contiguous(), topk_gate.contiguous()
    w1, b1, v, b_v, w2, b2 = (p.contiguous() for p in (w1, b1, v, b_v, w2, b2))
    n, _ = x.shape
    t, _, d = w1.shape
    if variant == "auto":
        from .functions import choose_variant  # measured (CUDA) / rule (else), cached; never while tracing

        variant = choose_variant(n, x.shape[1], d, t, topk_idx.shape[1], x.device, x.dtype)
    y, (a, u, routing) = experts_forward(x, topk_idx, topk_gate, w1, b1, v, b_v, w2, b2, variant, save)
    if not save:
        empty = x.new_empty((0,), dtype=torch.int32)
        return y, x.new_empty((0, d)), x.new_empty((0, d)), empty, empty.clone()
    if routing is None:  # dense variant (or N = 0): the routing its backward needs, computed here
        routing = route(topk_idx, t) if n else Routing(
            x.new_empty((0,), dtype=torch.int32), None, x.new_zeros((t + 1,), dtype=torch.int32), None)
    return y, a, u, routing.sorted_pairs, routing.expert_offsets


@experts_fwd.register_fake
def _experts_fwd_fake(x, topk_idx, topk_gate, w1, b1, v, b_v, w2, b2, variant, save):
    n, m = x.shape
    t, _, d = w1.shape
    k = topk_idx.shape[1]
    y = x.new_empty((n, m))
    if not save:
        empty = x.new_empty((0,), dtype=torch.int32)
        return y, x.new_empty((0, d)), x.new_empty((0, d)), empty, empty.clone()
    return (y, x.new_empty((n * k, d)), x.new_empty((n, d)), x.new_empty((n * k,), dtype=torch.int32),
            x.new_empty((t + 1,), dtype=torch.int32))


@torch.library.custom_op("mlit::experts_bwd", mutates_args=())
def experts_bwd(dy: Tensor, x: Tensor, topk_idx: Tensor, topk_gate: Tensor, w1: Tensor, v: Tensor, w2: Tensor,
                a: Tensor, u: Tensor, sorted_pairs: Tensor, expert_offsets: Tensor
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, d_topk_gate fp32, dw1, db1, dv, db_v, dw2, db2) of :func:`experts_fwd`."""
    routing = Routing(sorted_pairs.contiguous(), None, expert_offsets.contiguous(), None)
    c = lambda z: z.contiguous()  # noqa: E731
    return experts_backward(dy, c(x), c(topk_idx), c(topk_gate), c(w1), c(v), c(w2), c(a), c(u), routing)


@experts_bwd.register_fake
def _experts_bwd_fake(dy, x, topk_idx, topk_gate, w1, v, w2, a, u, sorted_pairs, expert_offsets):
    n, k = topk_idx.shape
    t, _, d = w1.shape
    m = x.shape[1]
    return (x.new_empty((n, m)), x.new_empty((n, k), dtype=torch.float32), torch.empty_like(w1),
            w1.new_empty((t, d)), torch.empty_like(v), x.new_empty((d,)), torch.empty_like(w2), x.new_empty((m,)))


def _experts_setup_context(ctx, inputs, output):
    x, topk_idx, topk_gate, w1, b1, v, b_v, w2, b2, variant, save = inputs
    _, a, u, sorted_pairs, expert_offsets = output
    ctx.save = save
    if save:
        ctx.save_for_backward(x, topk_idx, topk_gate, w1, v, w2, a, u, sorted_pairs, expert_offsets)


def _experts_backward(ctx, dy, _da, _du, _dsorted, _doffsets):
    if not ctx.save:
        raise RuntimeError("mlit::experts_fwd was called with save=False; call it with save=True to differentiate")
    x, topk_idx, topk_gate, w1, v, w2, a, u, sorted_pairs, expert_offsets = ctx.saved_tensors
    if dy is None:
        dy = torch.zeros_like(x)
    dx, dgate, dw1, db1, dv, db_v, dw2, db2 = experts_bwd(dy, x, topk_idx, topk_gate, w1, v, w2, a, u,
                                                          sorted_pairs, expert_offsets)
    return dx, None, dgate, dw1, db1, dv, db_v, dw2, db2, None, None


experts_fwd.register_autograd(_experts_backward, setup_context=_experts_setup_context)


__all__ = ["gate_fwd", "gate_bwd", "experts_fwd", "experts_bwd"]
