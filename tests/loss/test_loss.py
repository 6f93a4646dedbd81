"""The classification loss in one Triton launch forward and one backward (mlit_kernels.loss)
against its torch reference: the loss, the metrics (cross-entropy, aux, correct count) and the
gradients of the logits and of the auxiliary loss, per row, for every logits dtype, label
smoothing on and off, awkward batch sizes and class counts; bad inputs raise ValueError."""

from __future__ import annotations

import pytest
import torch

from mlit_kernels.common.tiling import interpreting
from mlit_kernels.meter import Meter
from mlit_kernels.reference import max_row_error as row_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("no CUDA and Triton kernels were imported without TRITON_INTERPRET=1", allow_module_level=True)

from mlit_kernels.loss import add_eval_sums, classification_loss  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}
BACKEND = {True: "triton", False: "reference"}


@pytest.mark.parametrize("b, c, dtype, smoothing", [
    (37, 10, torch.float16, 0.1), (70, 100, torch.float32, 0.0), (1, 102, torch.bfloat16, 0.1),
    (64, 10, torch.float32, 0.1),
])
def test_fused_loss_matches_the_reference(b, c, dtype, smoothing):
    g = torch.Generator().manual_seed(b + c)
    logits = (torch.randn(b, c, generator=g) * 3).to(DEVICE, dtype)
    logits[0, :2] = logits[0, :2].max()  # a tie: the first index is the argmax
    labels = torch.randint(0, c, (b,), generator=g).to(DEVICE)
    aux = torch.rand((), generator=g).to(DEVICE)
    out = {}
    for fused in (True, False):
        z = logits.clone().requires_grad_()
        a = aux.clone().requires_grad_()
        loss, metrics = classification_loss(z, labels, a, smoothing, 0.01, backend=BACKEND[fused])
        (loss * 7.0).backward()
        out[fused] = (loss, [m.float() for m in metrics], z.grad, a.grad)
    (loss, metrics, dz, da), (loss_r, metrics_r, dz_r, da_r) = out[True], out[False]
    assert loss.dtype == torch.float32 and loss.shape == () and dz.dtype == dtype
    assert torch.allclose(loss, loss_r, rtol=1e-5, atol=1e-6)
    assert torch.allclose(torch.stack(metrics), torch.stack(metrics_r), rtol=1e-5, atol=1e-6)
    assert len(metrics) == 4 and torch.equal(metrics[0], loss.detach())
    assert row_error(dz.double(), dz_r.double()) <= TOL[dtype]
    assert torch.allclose(da, da_r)


def test_fused_loss_checks_its_arguments():
    z = torch.randn(4, 10, device=DEVICE)
    labels = torch.zeros(4, dtype=torch.int64, device=DEVICE)
    aux = torch.zeros((), device=DEVICE)
    with pytest.raises(ValueError, match="logits must be"):
        classification_loss(z[0], labels, aux, 0.1, 0.01, backend="triton")
    with pytest.raises(ValueError, match="labels must be"):
        classification_loss(z, labels[:3], aux, 0.1, 0.01, backend="triton")
    with pytest.raises(ValueError, match="aux must be"):
        classification_loss(z, labels, aux.view(1), 0.1, 0.01, backend="triton")


def test_opcheck_loss_ops():
    """Schemas, fake tensors and autograd registration: torch.compile traces the ops, graphs capture them."""
    import mlit_kernels.loss.ops  # noqa: F401 - defines the ops (imported on first use otherwise)

    z = torch.randn(5, 10, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 10, (5,), device=DEVICE)
    aux = torch.rand((), device=DEVICE, requires_grad=True)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.mlit.classification_loss, (z, labels, aux, 0.1, 0.01), test_utils=checks)
    torch.library.opcheck(torch.ops.mlit.classification_eval_sums,
                          (z.detach(), labels, torch.zeros(3, dtype=torch.float64, device=DEVICE)), test_utils=checks)
    torch.library.opcheck(torch.ops.mlit.classification_loss_backward,
                          (torch.tensor(2.0, device=DEVICE), z.detach(), labels, 0.1, 0.01), test_utils=checks)


@pytest.mark.parametrize("b, c, dtype", [(37, 10, torch.float16), (1, 100, torch.float32), (70, 102, torch.bfloat16)])
def test_eval_sums_match_the_reference(b, c, dtype):
    """Evaluation's batch sums (rows, summed cross-entropy, correct count) added in one launch."""
    g = torch.Generator().manual_seed(b)
    logits = (torch.randn(b, c, generator=g) * 3).to(DEVICE, dtype)
    labels = torch.randint(0, c, (b,), generator=g).to(DEVICE)
    start = torch.tensor([5.0, 1.5, 2.0], dtype=torch.float64, device=DEVICE)
    got, want = start.clone(), start.clone()
    with Meter() as meter:
        add_eval_sums(logits, labels, got, backend="triton")
    add_eval_sums(logits, labels, want, backend="reference")
    assert (meter.launches, meter.syncs) == (1, 0)
    assert got[0] == want[0] == 5 + b and got[2] == want[2]
    assert torch.allclose(got, want, rtol=1e-5)
    with pytest.raises(ValueError, match="sums must be"):
        add_eval_sums(logits, labels, got.float(), backend="triton")
