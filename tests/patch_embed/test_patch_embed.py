"""The patch embedding in one Triton launch (mlit_kernels.patch_embed) against the torch path of
MLiTEncoder.embed (patchify, the dummy patch, the linear, the positions): tokens and the gradients
of the projection and of the position table, per row."""

from __future__ import annotations

import pytest
import torch

from mlit_kernels.common.tiling import interpreting
from mlit_kernels.reference import max_row_error as row_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("no CUDA and Triton kernels were imported without TRITON_INTERPRET=1", allow_module_level=True)

from mlit.config import encoder_config  # noqa: E402
from mlit.models.encoder import MLiTEncoder  # noqa: E402


@pytest.mark.parametrize("size, batch", [("XXS", 3), ("S", 17)])
def test_fused_embed_matches_the_torch_path(size, batch):
    torch.manual_seed(0)
    encoder = MLiTEncoder(encoder_config(size), backend="triton").to(DEVICE)
    images = torch.rand(batch, 3, 36, 36, device=DEVICE) * 2 - 1
    out = {}
    for backend in ("triton", "reference"):
        encoder.backend = backend
        encoder.zero_grad()
        tokens = encoder.embed(images)
        (tokens * torch.linspace(-1, 1, tokens.shape[-1], device=DEVICE)).square().sum().backward()
        out[backend] = (tokens, encoder.patch_embed.weight.grad.clone(), encoder.pos_embed.grad.clone())
    for i, (a, r) in enumerate(zip(out["triton"], out["reference"])):
        assert a.dtype == r.dtype and a.shape == r.shape
        assert row_error(a.reshape(-1, a.shape[-1]), r.reshape(-1, r.shape[-1])) <= 1e-5, f"output {i}"
    assert torch.equal(out["triton"][0][:, -1], encoder.pos_embed[0, -1].expand(batch, -1))  # the dummy patch


def test_opcheck_embed_ops():
    """Schemas, fake tensors and autograd registration of mlit::patch_embed and its backward."""
    images = torch.rand(2, 3, 36, 36, device=DEVICE)
    weight = torch.randn(108, 27, device=DEVICE, requires_grad=True)
    pos = torch.randn(145, 108, device=DEVICE, requires_grad=True)
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.mlit.patch_embed, (images, weight, pos, 3), test_utils=checks)
    torch.library.opcheck(torch.ops.mlit.patch_embed_backward,
                          (torch.randn(2, 145, 108, device=DEVICE), images, weight.detach(), pos.detach(), 3),
                          test_utils=checks)
