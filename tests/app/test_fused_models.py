"""The whole models on the Triton backend against the same models on the torch backend (fp32, tiny
configurations under Triton's interpreter): the mLiT classifier — its final norm and head in the
fused norm + linear kernels — and the mmLiT MAE — its norm + projection pairs, decoder input and
loss in kernels — give the same outputs, auxiliary losses and gradients of every parameter
(gate noise and dropout off, so both backends compute the same function); evaluation without the
auxiliary loss returns None and launches one kernel fewer a MoE layer."""

from __future__ import annotations

import pytest
import torch

from mlit.config import ImageConfig, TransformerConfig
from mlit.models import MLiTClassifier, MMLiT
from mlit.train.step import disable_gate_noise
from mlit_kernels.common.tiling import interpreting
from mlit_kernels.meter import Meter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("no CUDA and Triton kernels were imported without TRITON_INTERPRET=1", allow_module_level=True)

TINY = TransformerConfig("tiny", embed_dim=24, depth=2, hidden_first=16, hidden_last=8, num_heads=4, num_groups=2,
                         experts_per_stage=(3,), dropout=0.0)
DECODER = TINY.replace(name="tiny-decoder", depth=1, hidden_first=8)
IMAGE = ImageConfig(image_size=12)  # 16 patches + the dummy


def _images(b=3):
    return torch.randn(b, 3, 12, 12, generator=torch.Generator().manual_seed(0)).to(DEVICE)


def _pair(build):
    """(torch-backend model, Triton-backend model) with the same weights, gate noise off."""
    torch.manual_seed(0)
    ref = build("reference").to(DEVICE)
    fused = build("triton").to(DEVICE)
    fused.load_state_dict(ref.state_dict())
    for model in (ref, fused):
        disable_gate_noise(model)
    return ref, fused


def _close(a, b, what):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {m}")


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def test_classifier_matches_the_torch_backend():
    ref, fused = _pair(lambda backend: MLiTClassifier(TINY, 5, IMAGE, backend=backend))
    images = _images()
    for model in (ref, fused):
        logits, aux = model(images)
        (logits.square().mean() + aux).backward()
    _close(fused(images)[0], ref(images)[0], "logits")
    g_ref, g_fused = _grads(ref), _grads(fused)
    assert g_ref.keys() == g_fused.keys() and "head.weight" in g_fused and "encoder.norm.weight" in g_fused
    for name in g_ref:
        _close(g_fused[name], g_ref[name], name)


def test_evaluation_without_the_auxiliary_loss():
    ref, fused = _pair(lambda backend: MLiTClassifier(TINY, 5, IMAGE, backend=backend))
    images = _images()
    with torch.no_grad():
        for model in (ref, fused):
            model.eval()
        with Meter(dry_run=True) as with_aux:  # dry: counted, not run
            fused(images)
        with Meter(dry_run=True) as without:
            fused(images, need_aux=False)
        logits, aux = fused(images, need_aux=False)
        ref_logits, ref_aux = ref(images, need_aux=False)
    assert aux is None and ref_aux is None
    _close(logits, ref_logits, "logits")
    skipped = with_aux.by_name()["triton._fused_aux_kernel"]
    assert skipped == TINY.depth and "triton._fused_aux_kernel" not in without.by_name()
    assert without.launches <= with_aux.launches - skipped


def test_mae_matches_the_torch_backend():
    ref, fused = _pair(lambda backend: MMLiT(TINY, DECODER, IMAGE, backend=backend))
    images = _images()
    outs = {}
    for name, model in (("reference", ref), ("triton", fused)):
        torch.manual_seed(1)  # the same masks
        out = model(images)
        out.loss.backward()
        outs[name] = out
    for field in ("loss", "masked_mse", "unmasked_mse", "moe_loss", "pred"):
        _close(getattr(outs["triton"], field), getattr(outs["reference"], field), field)
    _close(outs["triton"].metrics, outs["reference"].metrics, "metrics")
    g_ref, g_fused = _grads(ref), _grads(fused)
    assert g_ref.keys() == g_fused.keys()
    assert {"mask_token", "decoder_pos_embed", "decoder_pred.weight"} <= g_fused.keys()
    for name in g_ref:
        _close(g_fused[name], g_ref[name], name)
