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
    x = fused_decoder_input(got_leaves[0], keep.to(DEVICE), got_leaves[1], got_leaves[2] if has_pos else None, P)
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
        x = fused_decoder_input(leaves[0], keep, leaves[1], leaves[2], 144)
    with Meter() as backward:
        x.backward(torch.ones_like(x))
    assert (forward.launches, forward.syncs) == (1, 0)
    assert (backward.triton_launches, backward.syncs) == (2, 0)


@pytest.mark.skipif(not interpreting(), reason="checks the Triton interpreter's launches (CPU only)")
def test_every_access_in_bounds():
    keep, mask, leaves = _case(3, 20, 5, 27, torch.float32, True)
    leaves = [t.requires_grad_() for t in leaves]
    with checked_kernels():
        x = fused_decoder_input(leaves[0], keep, leaves[1], leaves[2], 20)
        grads = torch.autograd.grad(x, leaves, torch.ones_like(x))
    assert torch.isfinite(x).all() and all(torch.isfinite(g).all() for g in grads)


def test_bad_inputs_name_the_argument():
    keep, mask, (latent, token, pos) = _case(2, 9, 3, 27, torch.float32, True)
    with pytest.raises(ValueError, match="keep must be"):
        fused_decoder_input(latent, keep.int(), token, pos, 9)
    with pytest.raises(ValueError, match="keep must have shape"):
        fused_decoder_input(latent, keep[:, 1:], token, pos, 9)
    with pytest.raises(ValueError, match="num_patches must be"):
        fused_decoder_input(latent, keep, token, None, 2)
    with pytest.raises(ValueError, match="token must hold"):
        fused_decoder_input(latent, keep, token[..., :-1], pos, 9)
    with pytest.raises(ValueError, match="pos must hold"):
        fused_decoder_input(latent, keep, token, pos[:, :-1], 9)
    with pytest.raises(ValueError, match="latent must be"):
        fused_decoder_input(latent[0], keep, token, pos, 9)


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
        v = fused_encoder_input(got_tokens, keep.to(DEVICE))
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
        v = fused_encoder_input(tokens, keep)
        (grad,) = torch.autograd.grad(v, tokens, torch.ones_like(v))
    assert torch.isfinite(grad).all() and grad.sum() == v.numel()


def test_encoder_input_bad_inputs():
    keep, mask, _ = _case(2, 9, 3, 27, torch.float32, False)
    tokens = torch.randn(2, 10, 27)
    with pytest.raises(ValueError, match="tokens must be"):
        fused_encoder_input(tokens[0], keep)
    with pytest.raises(ValueError, match="keep must be"):
        fused_encoder_input(tokens, keep.float())
    with pytest.raises(ValueError, match="keep must be"):
        fused_encoder_input(tokens, keep[:1])


def test_opcheck():
    """Schemas, fake tensors and autograd registration of the four ops."""
    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    keep, mask, (latent, token, pos) = _case(2, 9, 3, 27, torch.float32, True)
    keep = keep.to(DEVICE)
    tokens = torch.randn(2, 10, 27, device=DEVICE, requires_grad=True)
    torch.library.opcheck(torch.ops.mlit.mae_encoder_input, (tokens, keep), test_utils=checks)
    torch.library.opcheck(torch.ops.mlit.mae_encoder_input_backward, (torch.randn(2, 4, 27, device=DEVICE), keep, 9),
                          test_utils=checks)
    args = (latent.to(DEVICE).requires_grad_(), keep, token.reshape(27).to(DEVICE).requires_grad_(),
            pos.reshape(10, 27).to(DEVICE).requires_grad_(), 9)
    torch.library.opcheck(torch.ops.mlit.mae_decoder_input, args, test_utils=checks)
    torch.library.opcheck(torch.ops.mlit.mae_decoder_input_backward,
                          (torch.randn(2, 10, 27, device=DEVICE), keep, torch.float32), test_utils=checks)


def _broken_keep(B, P, K, seed=0):
    """keep rows that break random_masking's contract: a repeated entry (twice in image 0, three
    times in image 1), an entry past P and a negative one."""
    keep, _ = random_masking(B, P, K, torch.device("cpu"))
    keep = keep.clone()
    keep[0, 2] = keep[0, 0]
    keep[1, 1] = keep[1, 3] = keep[1, 4]
    keep[0, 4], keep[1, 0] = P + 3, -2
    return keep


def _named_reference(latent, keep, token, pos, P):
    """The decoder input's math with keep alone deciding: a patch row from the last slot naming it
    (scatter_'s order), else the mask token; entries outside [0, P) name nothing."""
    B, K1, d = latent.shape
    rows = []
    for b in range(B):
        owner = {int(p): j for j, p in enumerate(keep[b].tolist()) if 0 <= p < P}  # the last slot wins
        rows.append(torch.stack([latent[b, owner[p]] if p in owner else token.reshape(d).to(latent.dtype)
                                 for p in range(P)] + [latent[b, K1 - 1]]))
    x = torch.stack(rows)
    return x if pos is None else x + pos.reshape(P + 1, d)


@pytest.mark.skipif(not interpreting(), reason="checks the Triton interpreter's launches (CPU only)")
@pytest.mark.parametrize("has_pos", [True, False])
def test_decoder_input_contract_broken_keep(has_pos):
    """A repeated keep entry and entries outside [0, P): every access in bounds, every output row
    written (the checker poisons unwritten memory), values and gradients those of the math
    with keep alone deciding — the overridden slot gets no gradient, the hidden rows (every patch
    no slot names) feed the mask token's."""
    B, P, K, d = 2, 20, 6, 27
    keep = _broken_keep(B, P, K)
    g = torch.Generator().manual_seed(4)
    leaves = [torch.randn(B, K + 1, d, generator=g), torch.randn(d, generator=g)]
    if has_pos:
        leaves.append(torch.randn(P + 1, d, generator=g))
    got = [t.clone().requires_grad_() for t in leaves]
    with checked_kernels():
        x = fused_decoder_input(got[0], keep, got[1], got[2] if has_pos else None, P)
        dy = torch.randn(x.shape, generator=g)
        grads = torch.autograd.grad(x, got, dy)
    want = [t.double().requires_grad_() for t in leaves]
    want_x = _named_reference(want[0], keep, want[1], want[2] if has_pos else None, P)
    want_grads = torch.autograd.grad(want_x, want, dy.double())
    torch.testing.assert_close(x.double(), want_x, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)
    assert not grads[0][0, 0].any() and grads[0][0, 2].any()  # slot 0 overridden by slot 2 (same patch)


@pytest.mark.skipif(not interpreting(), reason="checks the Triton interpreter's launches (CPU only)")
def test_encoder_input_contract_broken_keep():
    """A repeated keep entry gathers the same token twice; its gradient is the sum of both slots'
    (gather's backward), entries outside [0, P) read as zeros and feed no gradient — every row of
    dtokens written, every access in bounds."""
    B, P, K, d = 2, 20, 6, 27
    keep = _broken_keep(B, P, K)
    tokens = torch.randn(B, P + 1, d, generator=torch.Generator().manual_seed(5), requires_grad=True)
    with checked_kernels():
        v = fused_encoder_input(tokens, keep)
        dv = torch.randn(v.shape, generator=torch.Generator().manual_seed(6))
        (grad,) = torch.autograd.grad(v, tokens, dv)
    ok = (keep >= 0) & (keep < P)
    want_tokens = tokens.detach().double().requires_grad_()
    safe = keep.clamp(0, P - 1)
    gathered = torch.gather(want_tokens[:, :-1], 1, safe.unsqueeze(-1).expand(-1, -1, d)) * ok.unsqueeze(-1)
    want = torch.cat([gathered, want_tokens[:, -1:]], dim=1)
    (want_grad,) = torch.autograd.grad(want, want_tokens, dv.double())
    torch.testing.assert_close(v.double(), want.detach(), rtol=0, atol=0)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-6, atol=1e-6)
