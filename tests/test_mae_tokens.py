"""The mmLiT token shuffles in Triton launches (mlit_kernels.mae_tokens) against the torch
paths they replace: the encoder's input (the kept patches gathered, the dummy appended; one launch
forward, one backward) and the decoder's input (the mask token cast and scattered, the dummy
appended, + the positions; one forward, two backward) — values and the gradients of the tokens,
the latent tokens, the mask token and the position table, fp32 and fp16, with and without the
table, at awkward sizes (1 and 36 visible patches, widths 27 / 40 / 108); every access in
bounds; bad inputs refused by name."""

from __future__ import annotations

import pytest
import torch
from bounds import checked_kernels

from mlit_kernels.common.tiling import interpreting
from mlit_kernels.meter import Meter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("no CUDA and Triton kernels were imported without TRITON_INTERPRET=1", allow_module_level=True)

from mlit_kernels.mae_tokens.ops import fused_decoder_input, fused_encoder_input  # noqa: E402
from mlit.models.mae import random_masking  # noqa: E402


def _reference(latent, keep, mask, token, pos):
    """MMLiT.forward's torch path."""
    B, _, d = latent.shape
    full = token.to(latent.dtype).expand(B, mask.shape[1], d).clone()
    full.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, d), latent[:, :-1])
    x = torch.cat([full, latent[:, -1:]], dim=1)
    return x if pos is None else x + pos


def _case(B, P, K, d, dtype, has_pos, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    keep, mask = random_masking(B, P, K, torch.device("cpu"))
    leaves = [(torch.randn(B, K + 1, d, generator=g)).to(dtype), torch.randn(1, 1, d, generator=g)]
    if has_pos:
        leaves.append(torch.randn(1, P + 1, d, generator=g))
    return keep, mask, leaves


@pytest.mark.parametrize("B, P, K, d, dtype, has_pos", [
    (3, 144, 36, 108, torch.float16, True), (5, 20, 1, 27, torch.float32, True), (2, 9, 8, 40, torch.float32, False),
])
def test_matches_the_torch_path(B, P, K, d, dtype, has_pos):
    keep, mask, leaves = _case(B, P, K, d, dtype, has_pos)
    got_leaves = [t.to(DEVICE).requires_grad_() for t in leaves]
    x = fused_decoder_input(got_leaves[0], keep.to(DEVICE), mask.to(DEVICE), got_leaves[1],
                            got_leaves[2] if has_pos else None)
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = [x] + list(torch.autograd.grad(x, got_leaves, dy))
    want_leaves = [t.detach().double().requires_grad_() for t in leaves]
    want_x = _reference(want_leaves[0], keep, mask, want_leaves[1], want_leaves[2] if has_pos else None)
    want = [want_x] + list(torch.autograd.grad(want_x, want_leaves, dy.cpu().double()))
    assert x.dtype == (torch.float32 if has_pos or dtype == torch.float32 else dtype)
    assert got[1].dtype == dtype and got[2].dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # fp16: the latent's gradient rounded to fp16
    for name, a, b in zip(["x", "latent", "token", "pos"], got, want):
        err = ((a.cpu().double() - b).abs().amax(-1) / (b.abs().amax(-1) + 1)).max().item()
        assert err <= tol, (name, err)


def test_launches():
    keep, mask, leaves = _case(4, 144, 36, 108, torch.float32, True)
    leaves = [t.requires_grad_() for t in leaves]
    with Meter() as forward:
        x = fused_decoder_input(leaves[0], keep, mask, leaves[1], leaves[2])
    with Meter() as backward:
        x.backward(torch.ones_like(x))
    assert (forward.launches, forward.syncs) == (1, 0)
    assert (backward.triton_launches, backward.syncs) == (2, 0)


@pytest.mark.skipif(not interpreting(), reason="checks the Triton interpreter's launches (CPU only)")
def test_every_access_in_bounds():
    keep, mask, leaves = _case(3, 20, 5, 27, torch.float32, True)
    leaves = [t.requires_grad_() for t in leaves]
    with checked_kernels():
        x = fused_decoder_input(leaves[0], keep, mask, leaves[1], leaves[2])
        grads = torch.autograd.grad(x, leaves, torch.ones_like(x))
    assert torch.isfinite(x).all() and all(torch.isfinite(g).all() for g in grads)


def test_bad_inputs_name_the_argument():
    keep, mask, (latent, token, pos) = _case(2, 9, 3, 27, torch.float32, True)
    with pytest.raises(ValueError, match="keep must be"):
        fused_decoder_input(latent, keep.int(), mask, token, pos)
    with pytest.raises(ValueError, match="keep must have shape"):
        fused_decoder_input(latent, keep[:, 1:], mask, token, pos)
    with pytest.raises(ValueError, match="mask must be"):
        fused_decoder_input(latent, keep, mask[:1], token, pos)
    with pytest.raises(ValueError, match="token must hold"):
        fused_decoder_input(latent, keep, mask, token[..., :-1], pos)
    with pytest.raises(ValueError, match="pos must hold"):
        fused_decoder_input(latent, keep, mask, token, pos[:, :-1])
    with pytest.raises(ValueError, match="latent must be"):
        fused_decoder_input(latent[0], keep, mask, token, pos)


def _encoder_reference(tokens, keep):
    """MMLiT.forward's torch path."""
    patches, dummy = tokens[:, :-1], tokens[:, -1:]
    return torch.cat([torch.gather(patches, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])), dummy], dim=1)


@pytest.mark.parametrize("B, P, K, d, dtype", [(3, 144, 36, 108, torch.float16), (5, 20, 1, 27, torch.float32)])
def test_encoder_input_matches_the_torch_path(B, P, K, d, dtype):
    keep, mask, _ = _case(B, P, K, d, dtype, False)
    tokens = torch.randn(B, P + 1, d, generator=torch.Generator().manual_seed(2)).to(dtype)
    got_tokens = tokens.to(DEVICE).requires_grad_()
    with Meter() as forward:
        v = fused_encoder_input(got_tokens, keep.to(DEVICE), mask.to(DEVICE))
    dv = torch.randn(v.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    with Meter() as backward:
        (grad,) = torch.autograd.grad(v, got_tokens, dv)
    want_tokens = tokens.clone().requires_grad_()
    want = _encoder_reference(want_tokens, keep)
    (want_grad,) = torch.autograd.grad(want, want_tokens, dv.cpu())
    assert torch.equal(v.cpu(), want.detach()) and torch.equal(grad.cpu(), want_grad)  # copies: exact
    assert (forward.launches, backward.launches, forward.syncs + backward.syncs) == (1, 1, 0)


@pytest.mark.skipif(not interpreting(), reason="checks the Triton interpreter's launches (CPU only)")
def test_encoder_input_in_bounds():
    keep, mask, _ = _case(3, 20, 5, 27, torch.float32, False)
    tokens = torch.randn(3, 21, 27, requires_grad=True)
    with checked_kernels():
        v = fused_encoder_input(tokens, keep, mask)
        (grad,) = torch.autograd.grad(v, tokens, torch.ones_like(v))
    assert torch.isfinite(grad).all() and grad.sum() == v.numel()


def test_encoder_input_bad_inputs():
    keep, mask, _ = _case(2, 9, 3, 27, torch.float32, False)
    tokens = torch.randn(2, 10, 27)
    with pytest.raises(ValueError, match="tokens must be"):
        fused_encoder_input(tokens[0], keep, mask)
    with pytest.raises(ValueError, match="mask must have shape"):
        fused_encoder_input(tokens[:, :-1], keep, mask)
    with pytest.raises(ValueError, match="keep must be"):
        fused_encoder_input(tokens, keep.float(), mask)


def test_opcheck():
    """Schemas, fake tensors and autograd registration of the four ops."""
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    keep, mask, (latent, token, pos) = _case(2, 9, 3, 27, torch.float32, True)
    keep, mask = keep.to(DEVICE), mask.to(DEVICE)
    tokens = torch.randn(2, 10, 27, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.mlit.mae_encoder_input, (tokens, keep, mask), test_utils=checks)
    torch.library.opcheck(torch.ops.mlit.mae_encoder_input_backward, (torch.randn(2, 4, 27, device=DEVICE), keep, mask),
                          test_utils=checks)
    args = (latent.to(DEVICE).requires_grad_(), keep, mask, token.reshape(27).to(DEVICE).requires_grad_(),
            pos.reshape(10, 27).to(DEVICE).requires_grad_())
    torch.library.opcheck(torch.ops.mlit.mae_decoder_input, args, test_utils=checks)
    torch.library.opcheck(torch.ops.mlit.mae_decoder_input_backward,
                          (torch.randn(2, 10, 27, device=DEVICE), keep, mask, torch.float32), test_utils=checks)


@pytest.mark.skipif(not interpreting(), reason="checks the Triton interpreter's launches (CPU only)")
def test_out_of_range_keep_entries_are_skipped():
    """keep entries outside [0, P) (a caller's bug; checking would need a host read) touch no memory
    outside the tensors: their rows read as zeros and nothing is written for them."""
    keep, mask, (latent, token, pos) = _case(2, 9, 3, 27, torch.float32, True)
    keep = keep.clone()
    keep[0, 0], keep[1, 2] = -4, 9 + 5
    tokens = torch.randn(2, 10, 27, requires_grad=True)
    latent.requires_grad_()
    with checked_kernels():
        v = fused_encoder_input(tokens, keep, mask)
        (grad,) = torch.autograd.grad(v, tokens, torch.ones_like(v))
        x = fused_decoder_input(latent, keep, mask, token, pos)
        (dlatent,) = torch.autograd.grad(x, latent, torch.ones_like(x))
    assert not v[0, 0].any() and not v[1, 2].any() and not dlatent[0, 0].any() and not dlatent[1, 2].any()
    hidden = mask.bool()
    assert not grad[:, :-1][hidden].any()  # the hidden rows' zeros are written whatever keep holds
