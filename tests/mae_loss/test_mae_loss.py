"""The MAE loss (Eq. 16) in two Triton launches forward and one backward (mlit_kernels.mae_loss)
against MMLiT.loss's torch reference: the loss, its three parts, the metrics vector and the
gradients of pred and of the MoE loss, per value, for fp32 / fp16 / bf16 pred, contiguous or the
decoder's [:, :-1] slice, awkward batch sizes and masks; launches counted; bad inputs raise
ValueError."""

from __future__ import annotations

import pytest
import torch

from mlit_kernels.common.tiling import interpreting
from mlit_kernels.reference import max_row_error as row_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("no CUDA and Triton kernels were imported without TRITON_INTERPRET=1", allow_module_level=True)

from mlit.config import TransformerConfig  # noqa: E402
from mlit.models import MMLiT, random_masking  # noqa: E402
from mlit_kernels.mae_loss.ops import fused_mae_loss  # noqa: E402
from mlit_kernels.meter import Meter  # noqa: E402

TINY = TransformerConfig("tiny", embed_dim=24, depth=1, hidden_first=12, hidden_last=6, num_heads=4, num_groups=2,
                         experts_per_stage=(3,))
# dpred: both sides round the same fp32 value (to within a few fp32 ulps) to pred's dtype: <= 1 ulp
# apart, 2 ulps allowed (fp16 2^-10, bf16 2^-7 relative to the row's largest value).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="module")
def model():
    return MMLiT(TINY, decoder_cfg=TINY, alpha=0.1, beta=0.5, device=DEVICE)


def _inputs(b, dtype, sliced, mask_kind, seed=0):
    g = torch.Generator().manual_seed(seed + b)
    images = torch.randn(b, 3, 36, 36, generator=g).to(DEVICE)
    leaf = torch.randn(b, 145 if sliced else 144, 27, generator=g).to(DEVICE, dtype)
    if mask_kind == "random":
        mask = random_masking(b, 144, 36, torch.device("cpu"))[1].to(DEVICE)
    else:  # every patch hidden but one
        mask = torch.ones(b, 144, device=DEVICE)
        mask[-1, 5] = 0.0
    return images, leaf, mask, torch.rand((), generator=g).to(DEVICE)


def _run(model, backend, images, leaf, mask, moe, sliced):
    model.set_backend(backend)
    x = leaf.clone().requires_grad_()
    a = moe.clone().requires_grad_()
    out = model.loss(images, x[:, :-1] if sliced else x, mask, a)
    (out.loss * 7.0).backward()
    parts = torch.stack([out.loss, out.masked_mse, out.unmasked_mse, out.moe_loss]).detach()
    return out, parts, x.grad, a.grad


@pytest.mark.parametrize("b, dtype, sliced, mask_kind", [
    (1, torch.float32, True, "random"), (3, torch.float16, True, "random"), (3, torch.float32, False, "all_but_one"),
    (37, torch.bfloat16, True, "all_but_one"), (3, torch.bfloat16, False, "random"),
    (1, torch.float16, False, "random"),
])
def test_fused_mae_loss_matches_the_reference(model, b, dtype, sliced, mask_kind):
    inputs = _inputs(b, dtype, sliced, mask_kind)
    out, parts, dx, da = _run(model, "triton", *inputs, sliced)
    ref, parts_r, dx_r, da_r = _run(model, "reference", *inputs, sliced)
    assert out.loss.dtype == torch.float32 and out.loss.shape == () and out.loss.requires_grad
    assert out.metrics.shape == (4,) and out.metrics.dtype == torch.float32 and not out.metrics.requires_grad
    torch.testing.assert_close(parts, parts_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.metrics, parts, rtol=0, atol=0)
    torch.testing.assert_close(ref.metrics, parts_r, rtol=0, atol=0)
    assert dx.dtype == dtype and dx.shape == dx_r.shape
    assert row_error(dx.double(), dx_r.double()) <= TOL[dtype]
    if sliced:
        assert not dx[:, -1].any()  # the decoder's dummy token gets no gradient
    torch.testing.assert_close(da, da_r, rtol=1e-6, atol=0)


def test_two_launches_forward_and_one_backward(model):
    model.set_backend("triton")
    images, pred, mask, moe = _inputs(2, torch.float16, False, "random")
    pred.requires_grad_()
    moe.requires_grad_()
    seed = torch.ones((), device=DEVICE)
    with Meter(dry_run=False) as forward:
        loss = model.loss(images, pred, mask, moe).loss
    with Meter(dry_run=False) as backward:
        torch.autograd.backward(loss, seed)
    assert forward.launches == forward.triton_launches == 2 and forward.syncs == 0, forward.table()
    assert backward.launches == backward.triton_launches == 1 and backward.syncs == 0, backward.table()
    assert set(forward.by_name()) == {"triton._mae_loss_part_kernel", "triton._mae_loss_sum_kernel"}
    assert set(backward.by_name()) == {"triton._mae_loss_bwd_kernel"}
    assert not forward.unmodelled() and not backward.unmodelled()


def test_backend_choice(model, monkeypatch):
    """"triton" takes the kernels anywhere; "auto" off CUDA and "reference" run torch."""
    monkeypatch.delenv("MLIT_UNCLEARED_KERNELS", raising=False)
    images, pred, mask, moe = _inputs(1, torch.float32, False, "random")
    for backend, kernels in (("triton", 2), ("auto", 2 if DEVICE == "cuda" else 0), ("reference", 0)):
        if backend == "auto" and DEVICE == "cuda":
            monkeypatch.setenv("MLIT_UNCLEARED_KERNELS", "1")
        model.set_backend(backend)
        with Meter(dry_run=True) as meter:
            model.loss(images, pred, mask, moe)
        assert meter.triton_launches == kernels, (backend, meter.table())


def test_fused_mae_loss_checks_its_arguments():
    images, pred, mask, moe = _inputs(2, torch.float32, False, "random")
    with pytest.raises(ValueError, match="images must be"):
        fused_mae_loss(images[0], pred, mask, moe, 3, 0.1, 0.5)
    with pytest.raises(ValueError, match="images must be"):
        fused_mae_loss(images[..., :35], pred, mask, moe, 3, 0.1, 0.5)
    with pytest.raises(ValueError, match="pred must be"):
        fused_mae_loss(images, pred[:, :-1], mask, moe, 3, 0.1, 0.5)
    with pytest.raises(ValueError, match="pred must be"):
        fused_mae_loss(images, pred.long(), mask, moe, 3, 0.1, 0.5)
    with pytest.raises(ValueError, match="mask must be"):
        fused_mae_loss(images, pred, mask[:1], moe, 3, 0.1, 0.5)
    with pytest.raises(ValueError, match="mask must be"):
        fused_mae_loss(images, pred, mask.bool(), moe, 3, 0.1, 0.5)
    with pytest.raises(ValueError, match="moe_loss must be"):
        fused_mae_loss(images, pred, mask, moe.view(1), 3, 0.1, 0.5)


def test_opcheck_mae_loss_ops():
    """Schemas, fake tensors and autograd registration: torch.compile traces the ops, graphs capture them."""
    images, pred, mask, moe = _inputs(1, torch.float32, False, "random")
    pred.requires_grad_()
    moe.requires_grad_()
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.mlit.mae_loss, (pred, images, mask, moe, 3, 0.1, 0.5), test_utils=checks)
    counts = torch.tensor([108.0, 36.0], device=DEVICE)
    torch.library.opcheck(torch.ops.mlit.mae_loss_backward,
                          (torch.tensor(2.0, device=DEVICE), pred.detach(), images, mask, counts, 3, 0.1, 0.5),
                          test_utils=checks)
