"""The MoE layer inside the real timm: timm's own VisionTransformer and ``timm.create_model`` with
``SharedSwiGLUMoE`` as ``mlp_layer`` (return_aux=False, the auxiliary loss gathered by
``collect_aux_loss``): a training step in which every parameter gets a gradient, deterministic
evaluation, a state_dict round trip, deferred (meta-device) initialisation, torch.compile of the
model; backends reference and triton (through Triton's interpreter on a CPU).

timm imports torchvision, whose PyPI wheels are CUDA builds: beside the pinned CPU build of torch
(2.13.0+cpu) torchvision cannot load its operators, so timm cannot be imported and this file
skips; CI runs it in its newest-versions environment (torch 2.14.1, a CUDA build that runs on the
CPU)."""

import io
import os
from functools import partial

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

try:
    import timm
    from timm.models.vision_transformer import VisionTransformer
except Exception as err:  # noqa: BLE001 - RuntimeError from a torchvision built for another torch
    pytest.skip(f"timm cannot be imported here ({type(err).__name__}: {err}); see the module docstring",
                allow_module_level=True)

from mlit_kernels import SharedSwiGLUMoE, collect_aux_loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(img_size=16, patch_size=4, num_classes=5, embed_dim=24, depth=2, num_heads=2, mlp_ratio=2.0)


def moe_layer(backend="reference"):
    return partial(SharedSwiGLUMoE, num_experts=4, k=2, return_aux=False, backend=backend)


def vit(backend="reference", seed=0):
    torch.manual_seed(seed)
    model = VisionTransformer(**SMALL, mlp_layer=moe_layer(backend), act_layer=nn.SiLU).to(DEVICE)
    with torch.no_grad():  # routing off its all-tied start (W_g = 0), as after some training
        for moe in (m for m in model.modules() if isinstance(m, SharedSwiGLUMoE)):
            moe.w_gate.normal_(0, 0.5)
    return model


def batch(n=3):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 16, 16, generator=g).to(DEVICE), torch.randint(0, 5, (n,), generator=g).to(DEVICE)


def train_step(model, images, labels):
    """One loss (cross-entropy + the layers' auxiliary losses) and its backward; returns the losses."""
    logits = model(images)
    aux = collect_aux_loss(model)
    loss = F.cross_entropy(logits, labels) + aux
    loss.backward()
    return loss.detach(), aux.detach()


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_training_step_gives_every_parameter_a_gradient(backend):
    model = vit(backend).train()
    loss, aux = train_step(model, *batch())
    assert torch.isfinite(loss) and aux > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing
    silent = [n for n, p in model.named_parameters() if not p.grad.abs().sum() > 0]
    assert not silent, silent  # W_noise too: the load loss reaches it through the noisy gate
    assert collect_aux_loss(model) == 0  # collected and reset


def test_triton_backend_trains_as_the_reference():
    """Same weights, same batch, eval-mode routing: the two backends' losses and gradients agree."""
    grads = {}
    for backend in ("reference", "triton"):
        model = vit(backend).eval()
        loss, _ = train_step(model, *batch())
        grads[backend] = loss, {n: p.grad for n, p in model.named_parameters()}
    torch.testing.assert_close(grads["triton"][0], grads["reference"][0], rtol=1e-5, atol=1e-6)
    for name, g in grads["reference"][1].items():
        torch.testing.assert_close(grads["triton"][1][name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_evaluation_is_deterministic():
    model, (images, _) = vit().eval(), batch()
    with torch.no_grad():
        first, second = model(images), model(images)
    assert torch.equal(first, second)


def test_state_dict_round_trip():
    model, (images, _) = vit(seed=0).eval(), batch()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    other = vit(seed=1).eval()
    with torch.no_grad():
        assert not torch.equal(other(images), model(images))
        buffer.seek(0)
        other.load_state_dict(torch.load(buffer, weights_only=True))
        assert torch.equal(other(images), model(images))
    assert {"blocks.0.mlp.w1", "blocks.0.mlp.v", "blocks.1.mlp.w_gate"} <= set(model.state_dict())


def test_create_model_with_the_moe_as_mlp_layer():
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL, mlp_layer=moe_layer(),
                              act_layer=nn.SiLU).to(DEVICE)
    moes = [m for m in model.modules() if isinstance(m, SharedSwiGLUMoE)]
    assert len(moes) == SMALL["depth"] and moes[0].hidden_dim == 48 and moes[0].dim == 24
    loss, aux = train_step(model.train(), *batch())
    assert torch.isfinite(loss) and aux > 0


def test_create_model_on_meta_then_materialised():
    """timm's deferred initialisation: device="meta" reaches the MoE layer's parameters (factory
    keywords); to_empty + init_weights runs its reset_parameters."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **SMALL, mlp_layer=moe_layer(),
                              act_layer=nn.SiLU, device="meta")
    assert all(p.is_meta for p in model.parameters())
    model = model.to_empty(device=DEVICE)
    model.init_weights()
    moe = model.blocks[0].mlp
    assert torch.equal(moe.w_gate, torch.zeros_like(moe.w_gate)) and moe.w1.abs().max() <= 24**-0.5
    assert torch.isfinite(model(batch()[0])).all()


def test_default_gelu_activation_warns_once_per_layer():
    with pytest.warns(UserWarning, match="act_layer='GELU' is not used"):
        VisionTransformer(**SMALL, mlp_layer=moe_layer())


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_of_the_model(backend):
    """torch.compile of the whole timm model ("aot_eager" on a CPU: the same ops as eager, so the
    comparison is exact up to summation order; inductor on a GPU): forward in eval matches
    eager, and a compiled training step gathers the auxiliary loss and gives every parameter a
    gradient."""
    torch._dynamo.reset()
    model, (images, labels) = vit(backend), batch()
    compiled = torch.compile(model, backend="inductor" if DEVICE == "cuda" else "aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled.eval()(images), model.eval()(images), rtol=1e-4, atol=1e-5)
    collect_aux_loss(model)
    loss, aux = train_step(compiled.train(), images, labels)
    assert torch.isfinite(loss) and aux > 0
    assert all(p.grad is not None for p in model.parameters())
    torch._dynamo.reset()
