"""The launch / sync / byte meter counts what a GPU would run, on the CPU."""

import pytest
import torch
import triton
import triton.language as tl

from mlit_kernels.meter import Meter


@triton.jit
def _double(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, 2 * tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def test_counts_aten_launches_views_and_syncs():
    with Meter() as meter:
        a = torch.ones(1000)            # 1 launch (fill), 4 kB written
        b = a + 1                       # 1 launch, 8 kB
        c = b.view(10, 100).t()         # views: free
        d = torch.empty(5)              # allocation: free
        total = c.sum()                 # 1 launch
        value = total.item()            # a host read: a sync, no launch
    assert value == 2000.0 and d.shape == (5,)
    assert meter.launches == 3 and meter.aten_launches == 3 and meter.triton_launches == 0
    assert meter.syncs == 1
    assert meter.bytes == 4000 + 8000 + 4004
    assert meter.by_name() == {"aten.ones": 1, "aten.add": 1, "aten.sum": 1}


def test_boolean_mask_and_nonzero_are_syncs():
    x = torch.arange(10.0)
    with Meter() as meter:
        x[x > 3]
        torch.nonzero(x)
    assert meter.syncs == 2


def test_sections_attribute_launches():
    with Meter() as meter:
        with meter.section("first"):
            torch.zeros(3)
        with meter.section("second"):
            torch.ones(3) * 2
    rows = meter.by_section()
    assert rows["first"]["launches"] == 1 and rows["second"]["launches"] == 2


def test_triton_launch_recorded_and_dry_run_skips_it():
    x = torch.arange(100, dtype=torch.float32)
    y = torch.zeros_like(x)
    with Meter() as meter:
        _double[(4,)](x, y, 100, BLOCK=32)
    assert meter.triton_launches == 1 and meter.launches == 1
    assert meter.bytes == 800 and torch.equal(y, 2 * x)
    y.zero_()
    with Meter(dry_run=True) as meter:
        _double[(4,)](x, y, 100, BLOCK=32)
    assert meter.triton_launches == 1 and not y.any()  # recorded, not run
    assert meter.records[0].meta["BLOCK"] == 32 and meter.records[0].meta["grid"] == (4,)


# ------------------------------------------------------------------------------------------------
# The MoE layer's budgets at the paper's shapes (bench/meters.py prints the same figures).

PAPER_LAYERS = [  # (m, d_h, t): the first and last MoE layer of S, XS and XXS
    (144, 144, 3), (144, 72, 5), (128, 96, 3), (128, 32, 5), (108, 81, 3), (108, 27, 5)]


@pytest.mark.parametrize("m,d_h,t", PAPER_LAYERS)
def test_fused_layer_budgets(m, d_h, t):
    """Training forward + backward ≤ 8 launches (2 forward kernels, 3 backward, the seed draw),
    eval forward ≤ 2, no host sync, modeled bytes ≤ 3 × the minimum, padding no more than
    rounding m and d_h up to multiples of 16 — at N = 256 × 145 tokens."""
    from mlit_kernels import SharedSwiGLUMoE
    from mlit_kernels.meter import measure_layer
    from mlit_kernels.common.tiling import round_up

    layer = SharedSwiGLUMoE(m, d_h, t, k=2, backend="triton")
    costs = measure_layer(layer, 256 * 145)
    assert costs.launches <= 8 and costs.launches_eval <= 2, costs.kernels
    assert costs.syncs == 0 and costs.syncs_eval == 0
    assert costs.bytes <= 3 * costs.min_bytes and costs.bytes_eval <= 3 * costs.min_bytes_eval
    assert costs.padding_m <= (round_up(m, 16) - m) / round_up(m, 16) + 1e-12
    assert costs.padding_d_h <= (round_up(d_h, 16) - d_h) / round_up(d_h, 16) + 1e-12


def test_reference_layer_has_no_host_sync():
    from mlit_kernels import SharedSwiGLUMoE
    from mlit_kernels.meter import measure_layer

    costs = measure_layer(SharedSwiGLUMoE(27, 27, 5, k=2), 64)
    assert costs.syncs == 0 and costs.syncs_eval == 0 and costs.launches > 8


def test_in_place_ops_returning_nothing_are_launches():
    """_foreach_* and fused optimizer ops write their arguments and return None: still kernels."""
    params = [torch.zeros(3), torch.zeros(4)]
    with Meter() as meter:
        torch._foreach_add_(params, 1.0)
    assert meter.launches == 1 and meter.bytes == 28


# ------------------------------------------------------------------------------------------------
# FLOPs, the modelled device time, the activations saved for the backward


def test_matmul_and_sdpa_flops():
    """mm: 2·m·k·n; SDPA with GQA (2 query heads per key head): 2·B·H·L·S·(E + E_v) forward,
    2·B·H·L·S·(3E + 2E_v) backward (the scores recomputed)."""
    a, b = torch.randn(5, 7), torch.randn(7, 3, requires_grad=True)
    with Meter() as meter:
        a @ b
    assert meter.flops == 2 * 5 * 7 * 3
    q = torch.randn(2, 4, 9, 8, requires_grad=True)
    k, v = torch.randn(2, 2, 9, 8, requires_grad=True), torch.randn(2, 2, 9, 8, requires_grad=True)
    with Meter() as forward:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    with Meter() as backward:
        out.sum().backward()
    pairs = 2 * 4 * 9 * 9
    sdpa = [r for r in forward.records if "scaled_dot_product" in r.name]
    assert len(sdpa) == 1 and sdpa[0].flops == 2 * pairs * (8 + 8)
    assert backward.flops == 2 * pairs * (3 * 8 + 2 * 8)


def test_fused_moe_flops_from_the_launch_arguments():
    """The dense and dispatch kernels' FLOPs (and the fused attention block's, the patch
    embedding's) come from their launch arguments (dry runs at N = 300)."""
    from mlit_kernels import SharedSwiGLUMoE, registry
    from mlit_kernels.attention import attention_block
    from mlit_kernels.patch_embed.ops import fused_patch_embed

    n, m, d_h, k = 300, 27, 40, 2
    dense = SharedSwiGLUMoE(m, d_h, 5, k=k, backend="triton")
    dispatch = SharedSwiGLUMoE(m, d_h, 12, k=k, backend="triton")
    x = torch.randn(n, m, requires_grad=True)
    with Meter(dry_run=True) as meter:
        for layer in (dense, dispatch):
            y, aux = layer(x)
            torch.autograd.backward((y, aux), (torch.randn(n, m), torch.ones(())))
        D, H, G, E = 36, 6, 3, 36 + 2 * 3 * 6
        weights = [torch.ones(D), torch.zeros(D), torch.randn(E, D), torch.zeros(E), torch.randn(D, D), torch.zeros(D)]
        attention_block(x.new_zeros(2, n // 2, D, requires_grad=True), *[w.requires_grad_() for w in weights], H,
                        G).sum().backward()
        patch_weight = torch.randn(m, 3 * 4 * 4, requires_grad=True)  # 2 images of 2 x 2 patches of 4 x 4
        fused_patch_embed(torch.randn(2, 3, 8, 8), patch_weight, torch.zeros(5, m, requires_grad=True), 4).sum().backward()
    flops = {r.name.removeprefix("triton."): r.flops for r in meter.records if r.kind == "triton"}
    noisy = 2  # clean and noisy gate logits
    assert flops["_fused_fwd_kernel"] == n * (2 * m * 5 * noisy + 2 * m * d_h * (5 + 1) + 2 * d_h * m)
    assert flops["_fused_bwd_weights_kernel"] == n * (2 * m * d_h * (k + 2) + 2 * m * 5 * noisy)
    assert flops["_gate_route_kernel"] == n * 2 * m * 12 * noisy
    assert flops["_experts_fwd_kernel"] == n * k * 6 * m * d_h  # x W_e, x V, h W_2 once per pair
    assert flops["_weights_dx_kernel"] == n * k * 12 * m * d_h + n * 2 * m * 12 * noisy  # a, u, dh recomputed
    assert flops["_fused_bwd_tokens_kernel"] > 0 and flops["_experts_bwd_kernel"] > 0
    assert flops["_ln_qkv_fwd_kernel"] == 2 * n * D * E and flops["_ln_qkv_bwd_kernel"] == 6 * n * D * E
    assert flops["_attn_fwd_kernel"] == 4 * n * (n // 2) * H * (D // H) + 2 * n * D * D
    assert flops["_attn_bwd_kernel"] == 14 * n * (n // 2) * H * (D // H) and flops["_proj_bwd_kernel"] == 4 * n * D * D
    assert flops["_embed_fwd_kernel"] == flops["_embed_bwd_kernel"] == 2 * 5 * 2 * 48 * m  # + the dummy patch
    modelled = {name for name, model in registry.kernel_flops().items() if model is not None}
    assert modelled <= set(flops)  # every FLOP model of a family ran here
    assert not meter.unmodelled()


def test_device_model_is_a_roofline_per_launch():
    from mlit_kernels.meter import H100, DeviceModel, Launch

    dev = DeviceModel("toy", bandwidth=1e9, peak_flops=1e12, launch_captured=1e-6, launch_uncaptured=5e-6)
    tiny, streaming, compute = (Launch("aten", "a", 10, "-"), Launch("aten", "b", 10**6, "-"),
                                Launch("aten", "c", 10, "-", flops=10**10))
    assert dev.launch_seconds(tiny, captured=True) == 1e-6 and dev.launch_seconds(tiny, captured=False) == 5e-6
    assert dev.launch_seconds(streaming, True) == pytest.approx(1e-3)
    assert dev.launch_seconds(compute, True) == pytest.approx(1e-2)
    assert dev.seconds([tiny, streaming, compute], True) == pytest.approx(1e-6 + 1e-3 + 1e-2)
    assert (H100.bandwidth, H100.peak_flops, H100.launch_captured) == (3.35e12, 989e12, 1.3e-6)


def test_saved_for_backward_counts_activations_not_weights():
    from mlit_kernels.meter import saved_for_backward

    w, w2 = torch.nn.Parameter(torch.randn(16, 8)), torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 16, requires_grad=True)  # an input that needs a gradient: an activation
    with saved_for_backward() as saved:
        h = torch.tanh(x @ w)            # mm saves x and w (a weight); tanh saves its output
        (h.half() @ w2.half()).sum()     # saves h.half() and the cast of w2 (a weight)
    assert saved.bytes == 4 * 16 * 4 + 4 * 8 * 4 + 4 * 8 * 2
