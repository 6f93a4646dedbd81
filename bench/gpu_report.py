"""GPU report for the Triton MoE backend: correctness on the device, timings, roofline.

    python bench/gpu_report.py report.md            # on a CUDA machine
    python bench/gpu_report.py --smoke smoke.md     # anywhere: tiny shapes, Triton interpreter on CPU
    python bench/gpu_report.py --compile-check 90 cc.md   # anywhere: compile every kernel for sm_90

1. Checks both Triton paths (dense = the fused kernels, dispatch; through ``moe_triton``) against
   the float64 reference on the device: the worst per-row relative error
   (:func:`mlit_kernels.reference.max_row_error`) of y, the auxiliary loss and every gradient,
   fp32, fp16 and bf16.
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

from mlit_kernels import SharedSwiGLUMoE, reference  # noqa: E402
from mlit_kernels.functional import moe_triton  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
NAMES = ("w_gate", "w_noise", "w1", "b1", "v", "b_v", "w2", "b2")
TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}  # as tests/test_kernels.py
# The float64 check at N = 4133 tokens: bf16's dW_g sums a cancelling gradient over them (worst
# per-row error 6.3e-2 under the CPU interpreter, 7.5e-2 on an H200: bench/RESULTS.md), so bf16
# gets 1e-1 there; fp32 and fp16 keep the suite's tolerances.
CHECK_TOL = {**TOL, torch.bfloat16: 1e-1}


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


def check(m, d_h, t, k, n, variant, dtype, train):
    """Worst per-row relative error over y, aux and every gradient, Triton vs float64 reference."""
    g = torch.Generator().manual_seed(n + m)
    p64 = {
        "w_gate": torch.randn(m, t, generator=g) * 0.5, "w_noise": torch.randn(m, t, generator=g) * 0.5,
        "w1": torch.randn(t, m, d_h, generator=g) / m**0.5, "b1": torch.randn(t, d_h, generator=g) * 0.1,
        "v": torch.randn(m, d_h, generator=g) / m**0.5, "b_v": torch.randn(d_h, generator=g) * 0.1,
        "w2": torch.randn(d_h, m, generator=g) / d_h**0.5, "b2": torch.randn(m, generator=g) * 0.1,
    }
    p64 = {name: v.to(torch.float32 if name in ("w_gate", "w_noise") else dtype).to(DEVICE, torch.float64)
           for name, v in p64.items()}
    x64 = torch.randn(n, m, generator=g).to(dtype).to(DEVICE, torch.float64)
    noise = torch.randn(n, t, generator=g).to(DEVICE)
    dy = torch.randn(n, m, generator=g).to(dtype).to(DEVICE, torch.float64)
    xt = x64.to(dtype).requires_grad_()
    pt = {name: v.to(torch.float32 if name in ("w_gate", "w_noise") else dtype).requires_grad_()
          for name, v in p64.items()}
    y, aux = moe_triton(xt, *pt.values(), k, train, noise=noise if train else None, variant=variant)
    torch.autograd.backward((y, aux), (dy.to(dtype), torch.tensor(10.0, device=DEVICE)))
    xr = x64.clone().requires_grad_()
    pr = {name: v.clone().requires_grad_() for name, v in p64.items()}
    yr, auxr = reference.moe_reference(xr, *pr.values(), k, train, noise=noise.double() if train else None)
    torch.autograd.backward((yr, auxr), (dy, torch.tensor(10.0, dtype=torch.float64, device=DEVICE)))
    errors = {"y": reference.max_row_error(y, yr), "aux": reference.max_row_error(aux, auxr),
              "x": reference.max_row_error(xt.grad, xr.grad)}
    errors.update({name: reference.max_row_error(pt[name].grad, pr[name].grad) for name in NAMES
                   if pr[name].grad is not None})
    worst = max(errors, key=errors.get)
    return errors[worst], worst


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


# ----------------------------------------------------------------------------------------------
# Compile check: every kernel × tuning configuration compiled to a cubin for a CUDA architecture
# with the ptxas bundled in the triton wheel — no GPU needed (catches what the interpreter does not
# enforce: tl.dot shapes, types, shared memory; reports registers and spills). Pointers are
# declared 16-byte aligned and integer sizes that are multiples of 16 as such, as the JIT
# specialises them at run time (without that every load compiles to a scalar 16-bit load).

_TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
# Pointer element types of the fused kernels in the mixed-precision configuration (x, y and the
# weights fp32: the residual stream and the master weights; the intermediates in the compute dtype).
_FUSED_PTRS = {"da_ptr": "act", "du_ptr": "act", "h_ptr": "act", "idx_ptr": "i32", "seed_ptr": "i64",
               "keep_ptr": "u8"}
# ... and of the dispatch path (the per-pair intermediates in the compute dtype, the routing int32).
_DISPATCH_PTRS = {"da_ptr": "act", "du_ptr": "act", "hc_ptr": "act", "o_ptr": "act", "idx_ptr": "i32",
                  "route_ptr": "i32", "local_ptr": "i32", "seed_ptr": "i64", "keep_ptr": "u8"}
_DISPATCH_KERNELS = {"_gate_route_kernel", "_experts_fwd_kernel", "_combine_kernel", "_experts_bwd_kernel",
                     "_weights_dx_kernel", "_shared_grads_kernel"}
_FLOAT_SCALARS = {"noise_eps", "drop_p", "ln_eps", "smoothing", "aux_weight", "w_importance", "w_load", "scale_lo",
                  "scale_span", "ratio_lo", "ratio_span", "hflip", "eps", "sm_scale", "alpha", "beta"}
# ... and of the augmentation kernels (uint8 images, float uniforms and tables; the output uint8
# between AutoAugment slots, float32 normalised at the end: ``out_ptr`` per NORMALISE).
_AUGMENT_PTRS = {"src_ptr": "u8", "x_ptr": "u8", "ops_ptr": "i64", "signed_ptr": "i1"}
# ... and of the fused attention block (x, y, dy, dx, the weights fp32; q | k | v, the attention
# output and their gradients in the compute dtype; statistics and partial sums fp32).
_ATTENTION_PTRS = {"qkv_ptr": "act", "o_ptr": "act", "do_ptr": "act", "dqkv_ptr": "act"}
_ATTENTION_KERNELS = {"_ln_qkv_fwd_kernel", "_attn_fwd_kernel", "_proj_bwd_kernel", "_attn_bwd_kernel",
                      "_ln_qkv_bwd_kernel"}


def _pointer_type(kernel_name, name, dtype, constexprs):
    if kernel_name in ("_crop_kernel", "_op_kernel"):
        if name == "out_ptr":
            return "fp32" if constexprs["NORMALISE"] else "u8"
        return _AUGMENT_PTRS.get(name, "fp32")
    if kernel_name.startswith("_fused"):
        kind = _FUSED_PTRS.get(name, "fp32")
        return _TRITON_TYPES[dtype] if kind == "act" else kind
    if kernel_name in ("_embed_fwd_kernel", "_embed_bwd_kernel", "_split_sum_kernel"):
        return "fp32"
    if kernel_name in ("_loss_fwd_kernel", "_loss_bwd_kernel", "_eval_sums_kernel"):
        return {"logits_ptr": "fp16", "dlogits_ptr": "fp16", "labels_ptr": "i64", "sums_ptr": "fp64"}.get(name, "fp32")
    if kernel_name.startswith(("_encoder_input", "_decoder_input")):  # the decoder's latent fp16 under autocast
        return {"latent_ptr": "fp16", "dlatent_ptr": "fp16", "keep_ptr": "i64"}.get(name, "fp32")
    if kernel_name in ("_mae_loss_part_kernel", "_mae_loss_sum_kernel", "_mae_loss_bwd_kernel"):
        return {"pred_ptr": "fp16", "dpred_ptr": "fp16"}.get(name, "fp32")
    if kernel_name in _DISPATCH_KERNELS | _ATTENTION_KERNELS:
        kind = (_DISPATCH_PTRS if kernel_name in _DISPATCH_KERNELS else _ATTENTION_PTRS).get(name, "fp32")
        return _TRITON_TYPES[dtype] if kind == "act" else kind
    return "i64" if name == "seed_ptr" else "fp32"  # gate_noise's kernel


def _compile_one(kernel, dtype, constexprs, num_warps, num_stages, arch, sizes):
    import re
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel  # the JITFunction
    signature, attrs = {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + _pointer_type(fn.__name__, name, dtype, constexprs)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_SCALARS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if sizes.get(name, 1) % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if fn.__name__ in ("_crop_kernel", "_op_kernel"):
        options["enable_fp_fusion"] = False  # as mlit_kernels.augment launches them on CUDA
    compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    usage = {"shared": compiled.metadata.shared}
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                 check=False).stdout
        for key in ("REG", "STACK", "LOCAL"):
            match = re.search(key + r":(\d+)", out)
            if match:
                usage[key.lower()] = int(match.group(1))
    return usage


def _fused_jobs(m, d_h, t, k, dtype, quick):
    """(kernel, constexprs, warps, stages) of the dense variant, every tuning configuration (the
    weight-gradient kernel has one fixed configuration)."""
    from mlit_kernels.common import split_sum
    from mlit_kernels.common.precision import dot_precision
    from mlit_kernels.common.settings import BLOCK_T, SUM_ROWS, WGRAD_WARPS
    from mlit_kernels.dense import kernels, launch

    jobs = []
    precision = dict(K=k, **dot_precision(dtype))
    configs = launch.CONFIGS[:1] if quick else launch.CONFIGS
    # training (noise, dropout) with the pre-MLP LayerNorm and the residual add folded in (the mLiT
    # layer) and without
    modes = [dict(NOISY=True, NOISE_MODE=2, LOAD_P=k < t, DROPOUT=True, NORM=block, RESIDUAL=block)
             for block in (True, False)]
    if not quick:
        modes.append(dict(NOISY=False, NOISE_MODE=0, LOAD_P=False, DROPOUT=False, NORM=True, RESIDUAL=True))
    for i, config in enumerate(configs):
        geo = launch.Geometry(256 * 145, m, d_h, t, config.block_n, config.num_warps)
        for mode in modes:
            jobs.append((kernels._fused_fwd_kernel, {**precision, **geo.token_constexprs(), **mode,
                                                      "SUM_ROWS": SUM_ROWS}, config.num_warps, 1))
            jobs.append((kernels._fused_bwd_tokens_kernel, {**precision, **geo.token_constexprs(), **mode,
                                                             "SQUARED": True, "UNBIASED": True, "SUM_ROWS": SUM_ROWS},
                         config.num_warps, 1))
            if i == 0:
                jobs.append((kernels._fused_bwd_weights_kernel, {**precision, **geo.weight_constexprs(),
                                                                 "NOISY": mode["NOISY"], "DROPOUT": mode["DROPOUT"],
                                                                 "NORM": mode["NORM"]}, WGRAD_WARPS, 1))
    jobs.append((kernels._fused_aux_kernel, dict(SQUARED=True, UNBIASED=True, BLOCK_P=launch.AUX_BLOCK_P,
                                                 BLOCK_T=BLOCK_T), 4, 1))
    jobs.append((split_sum._split_sum_kernel, dict(BLOCK=split_sum.SUM_BLOCK), 4, 1))
    return jobs


def _dispatch_jobs(m, d_h, t, k, dtype, quick):
    """(kernel, constexprs, warps, stages) of the dispatch path: shared V/W2 and separate experts,
    every tuning configuration of the grouped kernels (the first with --quick)."""
    from mlit_kernels.common import gating
    from mlit_kernels.common.tiling import hidden_chunk, width_chunks
    from mlit_kernels.common.precision import dot_precision
    from mlit_kernels.dispatch import kernels, launch

    m0, m1, m2, m3 = width_chunks(m)
    block_t = max(16, 1 << (t - 1).bit_length())
    base = dict(K=k, SUPER=kernels.SUPER_TILES, BLOCK_N=kernels.ROUTE_BLOCK_N, **dot_precision(dtype))
    chunks = dict(M0=m0, M1=m1, M2=m2, M3=m3, DC=hidden_chunk(d_h))
    g0, g1, g2, g3 = launch.weight_groups(m)[1]
    recomputes = (True, False)  # the weight gradients recompute a, u, dh or read them, by shape and N
    jobs = [(gating.noise_kernel, dict(BLOCK=1024), 4, 3)]
    for noisy in (True, False):
        mode = dict(NOISY=noisy, NOISE_MODE=2 if noisy else 0, LOAD_P=noisy and k < t)
        jobs.append((kernels._gate_route_kernel, dict(K=k, **mode, BLOCK_N=kernels.ROUTE_BLOCK_N, BLOCK_T=block_t),
                     4, 3))
        jobs.append((kernels._combine_kernel, dict(K=k, DROPOUT=noisy, SQUARED=True, UNBIASED=True,
                                                   BLOCK_N=kernels.ROUTE_BLOCK_N, BLOCK_M=launch.COMBINE_BLOCK_M,
                                                   BLOCK_T=block_t), 4, 3))
    for sep in (0, 1):
        seps = dict(SEP_W1=1, SEP_V=sep, SEP_W2=sep)
        for config in launch.configs_for(m)[:1] if quick else launch.configs_for(m):
            grouped = dict(base, **seps, **chunks, BR=config.block_r)
            jobs.append((kernels._experts_fwd_kernel, grouped, config.num_warps, 1))
            for recompute in recomputes:
                jobs.append((kernels._experts_bwd_kernel, dict(grouped, NOISY=True, NOISE_MODE=2, LOAD_P=k < t,
                                                               DROPOUT=True, SQUARED=True, UNBIASED=True,
                                                               RECOMPUTE=recompute, BLOCK_T=block_t),
                             config.num_warps, 1))
        for recompute in recomputes:
            jobs.append((kernels._weights_dx_kernel, dict(base, **seps, NOISY=True, DROPOUT=True, RECOMPUTE=recompute,
                                                          WD=launch.WEIGHT_D_CHUNK, G0=g0, G1=g1, G2=g2, G3=g3,
                                                          WB=launch.WEIGHT_TILE, BLOCK_T=block_t),
                         launch.WEIGHT_WARPS, 1))
    jobs.append((kernels._shared_grads_kernel, dict(BLOCK=launch.SHARED_BLOCK), 4, 1))
    return jobs


def _attention_jobs(dim, heads, groups, dtype, quick):
    """(kernel, constexprs, warps, stages) of the fused attention block, every tuning configuration
    (the first with --quick); the split sum has one."""
    from mlit_kernels.attention import kernels, launch
    from mlit_kernels.common import split_sum
    from mlit_kernels.common.precision import dot_precision
    from mlit_kernels.norm_linear import ops as norm_linear

    shape = launch.Shape(256, 145, dim, heads, groups)
    pads = shape.pads
    base = dot_precision(dtype)
    jobs = []
    for config in launch.CONFIGS[:1] if quick else launch.CONFIGS:
        w = config.num_warps
        jobs += [(kernels._ln_qkv_fwd_kernel, dict(D_PAD=pads["D_PAD"], BLOCK_M=launch.BLOCK_M,
                                                   BLOCK_E=launch.BLOCK_E, **base, HAS_BIAS=True), w, 1),
                 (kernels._attn_fwd_kernel, dict(**pads, BLOCK_M=launch.BLOCK_M, BLOCK_N=launch.BLOCK_N, **base), w, 1),
                 (kernels._proj_bwd_kernel, dict(**pads, ROWS=launch.PROJ_ROWS, BLOCK_M=launch.BLOCK_M, **base), w, 1),
                 (kernels._attn_bwd_kernel, dict(HD_PAD=pads["HD_PAD"], BLOCK_M=launch.BLOCK_M, BLOCK_N=launch.BLOCK_N,
                                                 **base), w, 1),
                 (kernels._ln_qkv_bwd_kernel, dict(D_PAD=pads["D_PAD"], BLOCK_M=launch.BLOCK_M,
                                                   BLOCK_E=launch.BLOCK_E, **base, HAS_RESIDUAL=True), w, 1)]
    jobs.append((split_sum._split_sum_kernel, dict(BLOCK=split_sum.SUM_BLOCK), 4, 1))
    # the same LayerNorm + projection kernels as mlit_kernels.norm_linear launches them (the heads)
    jobs += [(kernels._ln_qkv_fwd_kernel, dict(D_PAD=pads["D_PAD"], BLOCK_M=launch.BLOCK_M, BLOCK_E=launch.BLOCK_E,
                                               **base, HAS_BIAS=False), norm_linear.NUM_WARPS, 1),
             (kernels._ln_qkv_bwd_kernel, dict(D_PAD=pads["D_PAD"], BLOCK_M=launch.BLOCK_M, BLOCK_E=launch.BLOCK_E,
                                               **base, HAS_RESIDUAL=False), norm_linear.NUM_WARPS, 1)]
    return jobs


def _augment_jobs():
    """(kernel, constexprs, warps, stages) of the augmentation kernels at 36 × 36 (28 uniforms an image)."""
    from mlit_kernels.augment import kernels as augment_kernels

    block = triton.next_power_of_2(36 * 36)
    jobs = [(augment_kernels._crop_kernel, dict(S=36, D=28, NORMALISE=normalise, BLOCK=block), 4, 3)
            for normalise in (False, True)]
    jobs += [(augment_kernels._op_kernel, dict(SLOT=slot, S=36, D=28, NORMALISE=slot == 1, BLOCK=block), 4, 3)
             for slot in (0, 1)]
    return jobs


def _loss_jobs():
    """(kernel, constexprs, warps, stages) of the classification loss and evaluation sums (10 and 100
    classes), the MAE loss (3 × 3 patches of 3 channels), the patch embedding (m = 108 and 144) and
    the MAE encoder's and decoder's inputs (width 108)."""
    from mlit_kernels.loss import kernels as loss_kernels
    from mlit_kernels.mae_loss import kernels as mk
    from mlit_kernels.mae_tokens import kernels as dk
    from mlit_kernels.patch_embed import kernels as ek

    jobs = [(kernel, dict(BLOCK_B=loss_kernels.BLOCK_B, BLOCK_C=c), 4, 1)
            for kernel in (loss_kernels._loss_fwd_kernel, loss_kernels._loss_bwd_kernel,
                           loss_kernels._eval_sums_kernel) for c in (16, 128)]
    jobs += [(kernel, dict(BLOCK_P=dk.BLOCK_P, BLOCK_D=128), 4, 1)
             for kernel in (dk._encoder_input_fwd_kernel, dk._encoder_input_bwd_kernel)]
    jobs.append((dk._decoder_input_fwd_kernel, dict(HAS_POS=True, BLOCK_P=dk.BLOCK_P, BLOCK_D=128), 4, 1))
    jobs.append((dk._decoder_input_bwd_kernel, dict(BLOCK_P=dk.BLOCK_P, POS_BLOCK=dk.POS_BLOCK, BLOCK_D=128), 4, 1))
    jobs += [(mk._mae_loss_part_kernel, dict(C=3, P=3, BLOCK_R=mk.TILE // 32, BLOCK_D=32), 4, 1),
             (mk._mae_loss_sum_kernel, dict(BLOCK=mk.SUM_BLOCK), 4, 1),
             (mk._mae_loss_bwd_kernel, dict(C=3, P=3, BLOCK_R=mk.TILE // 32, BLOCK_D=32), 4, 1)]
    for block_m in (128, 256):
        jobs.append((ek._embed_fwd_kernel, dict(C=3, P=3, BLOCK_T=ek.BLOCK_T, BLOCK_M=block_m), 4, 1))
        jobs.append((ek._embed_bwd_kernel, dict(P=3, BLOCK_B=ek.BLOCK_B, BLOCK_M=block_m, K_PAD=ek.K_PAD), 4, 1))
    return jobs


def compile_check(arch=90, quick=False):
    """Compile every kernel for sm_<arch> at the paper's shapes; returns markdown rows and failures."""
    shapes_ = [(144, 144, 3, 2), (144, 72, 5, 2), (108, 81, 3, 2), (108, 27, 5, 2)] if not quick else [
        (144, 144, 3, 2), (108, 27, 5, 2)]
    # the dispatch path at the many-expert shapes (t > 8; m 192-1024, d_h 256-4096)
    many = [(192, 768, 16, 2), (384, 1536, 64, 2), (1024, 4096, 64, 4)] if not quick else [(1024, 4096, 64, 2)]
    dtypes = [torch.float16, torch.bfloat16, torch.float32] if not quick else [torch.float16]
    # the fused attention block of S, XS and XXS (and the MAE decoder): (width, heads, groups)
    attention = [(144, 8, 4), (128, 8, 4), (108, 6, 3)] if not quick else [(108, 6, 3)]
    rows, failures = [], 0
    shapes_ = ([("augment", None, None, None), ("loss", None, None, None)] + shapes_ + many
               + [("attention", *a) for a in attention])
    for m, d_h, t, k in shapes_:
        sizes = dict(N=256 * 145, H_in=32, W_in=32, **(dict(M=m, D=d_h, T=t) if isinstance(m, int) else {}))
        for dtype in dtypes if m not in ("augment", "loss") else [torch.float16 if m == "loss" else torch.float32]:
            if m == "augment":
                jobs = _augment_jobs()
            elif m == "attention":
                jobs = _attention_jobs(d_h, t, k, dtype, quick)
                sizes = dict(N=256 * 145, n_tok=145, D=d_h, E=d_h + 2 * k * (d_h // t), H=t, G=k, HD=d_h // t)
            elif m == "loss":
                jobs = _loss_jobs()
            elif (m, d_h, t, k) in many:
                jobs = _dispatch_jobs(m, d_h, t, k, dtype, quick)
            else:
                jobs = _fused_jobs(m, d_h, t, k, dtype, quick)
            for kernel, constexprs, warps, stages in jobs:
                name = (kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel).__name__
                label = ", ".join(f"{key}={val}" for key, val in constexprs.items()
                                  if key in ("BLOCK_N", "BLOCK_R", "BR", "ROWS", "SEP_V", "NOISY", "DROPOUT", "NORM",
                                             "NORMALISE", "SLOT", "RECOMPUTE", "BLOCK_C", "BLOCK_M"))
                try:
                    usage = _compile_one(kernel, dtype, constexprs, warps, stages, arch, sizes)
                    ok = usage["shared"] <= 227 * 1024
                    status = "ok" if ok else "shared memory too large"
                    if ok and usage.get("local", 0):
                        status = "ok (spills)"
                except Exception as exc:  # noqa: BLE001 - report every failure
                    usage, ok, status = {}, False, f"FAIL: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                failures += not ok
                shape = {"augment": m, "loss": m, "attention": f"attention {d_h}/{t}/{k}"}.get(m, f"{m}/{d_h}/{t}/{k}")
                row = (f"| {shape} | {str(dtype)[6:]} | {name} | {label} w{warps}s{stages} | "
                       f"{usage.get('shared', '-')} | {usage.get('reg', '-')} | {usage.get('stack', '-')} | "
                       f"{usage.get('local', '-')} | {status} |")
                rows.append(row)
                print(row, flush=True)
    return rows, failures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", default="gpu_report.md", help="markdown file to write")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU through the interpreter")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--compile-check", type=int, metavar="ARCH", default=None,
                        help="only compile every kernel for sm_ARCH (e.g. 90) with the bundled ptxas; no GPU needed")
    parser.add_argument("--quick", action="store_true", help="with --compile-check: one shape, fp16, one config")
    args = parser.parse_args()
    if args.compile_check is not None:
        header = ["# mlit_kernels compile check", "", f"- target: sm_{args.compile_check}, triton {triton.__version__}",
                  "", "| m/d_h/t/k | dtype | kernel | config | shared B | regs | stack B | local B | status |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        print("\n".join(header), flush=True)
        rows, failures = compile_check(args.compile_check, args.quick)
        with open(args.output, "w", encoding="utf-8") as f:
            f.write("\n".join(header + rows) + "\n")
        print(f"\nwritten to {args.output}; {failures} failure(s)")
        return 1 if failures else 0
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
        "## Correctness (worst per-row relative error over y, aux and all gradients vs float64)",
        "",
        "| shape | N | variant | dtype | mode | max rel. error | worst |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(lines), flush=True)
    failures = 0
    for name, m, d_h, t, k, token_counts in shapes(smoke):
        check_n = token_counts[0] if smoke else 4096 + 37
        for variant in ("dispatch", "dense"):
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                for train in (True, False):
                    err, worst = check(m, d_h, t, k, check_n, variant, dtype, train)
                    tol = CHECK_TOL[dtype]
                    failures += err > tol
                    row = (f"| {name} | {check_n} | {variant} | {str(dtype)[6:]} | {'train' if train else 'eval'} | "
                           f"{err:.2e}{'' if err <= tol else ' FAIL'} | {worst} |")
                    lines.append(row)
                    print(row, flush=True)
    for name, m, d_h, t, k, token_counts, _ in many_expert_shapes(smoke):  # fp16 training: the dispatch kernels
        err, worst = check(m, d_h, t, k, token_counts[0] if smoke else 4096 + 37, "dispatch", torch.float16, True)
        failures += err > TOL[torch.float16]
        row = (f"| {name} | {token_counts[0] if smoke else 4096 + 37} | dispatch | float16 | train | "
               f"{err:.2e}{'' if err <= TOL[torch.float16] else ' FAIL'} | {worst} |")
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
