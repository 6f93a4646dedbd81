"""The Triton MoE as torch.library custom ops: opcheck, and torch.compile(fullgraph=True) of the
layer and of a tiny mLiT classifier against the eager Triton path (CPU: Triton's interpreter and
the "aot_eager" backend, which runs the same ops as eager, so results are compared bit for bit)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mlit_kernels import SharedSwiGLUMoE  # noqa: E402
from mlit_kernels.common.tiling import interpreting  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("no CUDA and Triton kernels were imported without TRITON_INTERPRET=1", allow_module_level=True)

from mlit_kernels import ops  # noqa: E402
from mlit_kernels.functional import moe_triton  # noqa: E402

OPCHECK = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles new modules: start from an empty cache (the recompile limit is per code object)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _params(m=16, d_h=27, t=5, dtype=torch.float32, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    p = {"w_gate": r(m, t) * 0.5, "w_noise": r(m, t) * 0.5, "w1": r(t, m, d_h) / m**0.5, "b1": r(t, d_h) * 0.1,
         "v": r(m, d_h) / m**0.5, "b_v": r(d_h) * 0.1, "w2": r(d_h, m) / d_h**0.5, "b2": r(m) * 0.1}
    return {n: v.to(DEVICE, torch.float32 if n in ("w_gate", "w_noise") else dtype).requires_grad_(requires_grad)
            for n, v in p.items()}


def _seed(value):
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("training,noise_mode,dropout", [(True, "seed", 0.2), (True, "tensor", 0.0), (False, None, 0.0)])
def test_opcheck_fused(training, noise_mode, dropout):
    n, m, d_h, t, k = 21, 27, 40, 5, 2
    p = _params(m, d_h, t)
    x = torch.randn(n, m, device=DEVICE, requires_grad=True)
    noise = torch.randn(n, t, device=DEVICE) if noise_mode == "tensor" else None
    options = (k, training, True, dropout, 1e-2, 1e-2, 1e-2, True, True, torch.float32, True)
    args = (x, *p.values(), _seed(7), noise, *options)
    torch.library.opcheck(ops.fused_moe, args, test_utils=OPCHECK)
    with torch.no_grad():
        _, _, idx, stats, keep = ops.fused_moe(*args)
    detached = [a.detach() for a in (x, *p.values())][:8]
    bwd = (torch.randn(n, m, device=DEVICE), torch.tensor(3.0, device=DEVICE), *detached, _seed(7), noise, idx, stats,
           keep, *options)
    torch.library.opcheck(ops.fused_moe_backward, bwd, test_utils=OPCHECK)


def test_opcheck_fused_norm():
    """The dense layer with the LayerNorm and the residual add folded in (mlit::fused_norm_moe)."""
    n, m, d_h, t, k = 21, 27, 40, 5, 2
    p = _params(m, d_h, t)
    x = torch.randn(n, m, device=DEVICE, requires_grad=True)
    ln = (torch.ones(m, device=DEVICE, requires_grad=True), torch.zeros(m, device=DEVICE, requires_grad=True))
    options = (k, True, True, 0.2, 1e-2, 1e-2, 1e-2, True, True, torch.float32, True)
    args = (x, *ln, 1e-5, True, *p.values(), _seed(7), None, *options)
    torch.library.opcheck(ops.fused_norm_moe, args, test_utils=OPCHECK)
    with torch.no_grad():
        _, _, idx, stats, keep, ln_stats = ops.fused_norm_moe(*args)
    detached = [a.detach() for a in (x, *ln)] + [1e-5, True] + [a.detach() for a in p.values()][:7]
    bwd = (torch.randn(n, m, device=DEVICE), torch.tensor(3.0, device=DEVICE), *detached, _seed(7), None, idx, stats,
           keep, ln_stats, *options)
    torch.library.opcheck(ops.fused_norm_moe_backward, bwd, test_utils=OPCHECK)


@pytest.mark.parametrize("training,noise_mode,dropout,separate", [(True, "seed", 0.2, False), (True, "tensor", 0.0, True),
                                                                 (False, None, 0.0, False)])
def test_opcheck_dispatch(training, noise_mode, dropout, separate):
    n, m, d_h, t, k = 37, 16, 16, 9, 2
    p = _params(m, d_h, t)
    if separate:  # one V, W2 per expert
        p.update({name: torch.randn(t, *p[name].shape, device=DEVICE, requires_grad=True)
                  for name in ("v", "b_v", "w2", "b2")})
    x = torch.randn(n, m, device=DEVICE, requires_grad=True)
    noise = torch.randn(n, t, device=DEVICE) if noise_mode == "tensor" else None
    options = (k, training, True, dropout, 1e-2, 1e-2, 1e-2, True, True, torch.float32)
    args = (x, *p.values(), _seed(7), noise, *options)
    torch.library.opcheck(ops.dispatch_moe, args, test_utils=OPCHECK)
    with torch.no_grad():
        saved = ops.dispatch_moe(*args)[2:]
    bwd = (torch.randn(n, m, device=DEVICE), torch.tensor(3.0, device=DEVICE), *(a.detach() for a in (x, *p.values())),
           _seed(7), noise, *saved, *options)
    torch.library.opcheck(ops.dispatch_moe_backward, bwd, test_utils=OPCHECK)


def _grads(module, x):
    return [x.grad] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("variant", ["dispatch", "dense"])
def test_compiled_layer_matches_eager(variant):
    torch.manual_seed(0)
    layer = SharedSwiGLUMoE(16, 27, 5, k=2, dropout=0.0, backend="triton", triton_variant=variant).to(DEVICE)
    with torch.no_grad():
        layer.w_gate.normal_(0, 0.5)
        layer.w_noise.normal_(0, 0.5)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x0 = torch.randn(2, 13, 16, device=DEVICE)
    noise = torch.randn(26, 5, device=DEVICE)
    for training in (True, False):
        layer.train(training)
        results = []
        for module in (compiled, layer):
            layer.zero_grad(set_to_none=True)
            x = x0.clone().requires_grad_()
            y, aux = module(x, noise if training else None)
            (y.square().sum() + 10 * aux).backward()
            results.append([y, aux] + _grads(layer, x))
        for a, b in zip(*results):
            assert (a is None and b is None) or torch.equal(a, b)  # (W_noise has no gradient in eval)
    with torch.no_grad():  # inference: save=False (a different graph)
        assert torch.equal(compiled(x0)[0], layer(x0)[0])
    layer.train()
    for tokens in (7, 9):  # another N: recompiled once with a dynamic N (fake impls take symbolic sizes)
        x = torch.randn(2, tokens, 16, device=DEVICE)
        noise = torch.randn(2 * tokens, 5, device=DEVICE)
        assert torch.equal(compiled(x, noise)[0], layer(x, noise)[0])


def test_compiled_layer_inductor():
    """The default inductor backend (C++ on CPU here) around the opaque ops: same results up to
    inductor's fused arithmetic outside the ops."""
    torch.manual_seed(1)
    layer = SharedSwiGLUMoE(16, 27, 5, k=2, dropout=0.0, backend="triton", triton_variant="dispatch").to(DEVICE)
    with torch.no_grad():
        layer.w_gate.normal_(0, 0.5)
        layer.w_noise.normal_(0, 0.5)
    compiled = torch.compile(layer, fullgraph=True)
    x0 = torch.randn(2, 13, 16, device=DEVICE)
    noise = torch.randn(26, 5, device=DEVICE)
    results = []
    for module in (compiled, layer):
        layer.zero_grad(set_to_none=True)
        x = x0.clone().requires_grad_()
        y, aux = module(x, noise)
        (y.square().sum() + 10 * aux).backward()
        results.append([y, aux] + _grads(layer, x))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["dense", "dispatch"])
def test_compiled_moe_triton_in_kernel_noise(variant):
    """The gate seed is an op input: an explicit seed gives the eager draws; seed=None draws one on
    the device with torch.randint inside the graph (so torch.manual_seed reproduces it)."""
    p = _params(16, 27, 5, seed=4)
    x = torch.randn(23, 16, device=DEVICE)
    fn = torch.compile(moe_triton, backend="aot_eager", fullgraph=True)
    dropout = 0.1  # fused into the kernels on both variants: drawn from the seed too
    y_eager, aux_eager = moe_triton(x, *p.values(), 2, True, seed=99, variant=variant, dropout=dropout)
    y, aux = fn(x, *p.values(), 2, True, seed=_seed(99), variant=variant, dropout=dropout)
    assert torch.equal(y, y_eager) and torch.equal(aux, aux_eager)
    torch.manual_seed(5)
    y1, _ = fn(x, *p.values(), 2, True, variant=variant)
    torch.manual_seed(5)
    y2, _ = moe_triton(x, *p.values(), 2, True, variant=variant)
    assert torch.equal(y1, y2)


def _tiny_classifier():
    from mlit.config import ImageConfig, TransformerConfig
    from mlit.models import MLiTClassifier

    cfg = TransformerConfig(name="tiny", embed_dim=24, depth=3, hidden_first=12, hidden_last=6, num_heads=4,
                            num_groups=2, dropout=0.0)
    torch.manual_seed(0)
    model = MLiTClassifier(cfg, num_classes=5, image=ImageConfig(image_size=12, patch_size=3), backend="triton")
    for layer in model.modules():
        if isinstance(layer, SharedSwiGLUMoE):
            with torch.no_grad():
                layer.w_gate.normal_(0, 0.3)
                layer.w_noise.normal_(0, 0.3)
            layer.noisy_gating = False
    for module in model.modules():  # dropout 0 everywhere
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model.to(DEVICE)


def test_compiled_classifier_matches_eager():
    model = _tiny_classifier()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    images = torch.randn(3, 3, 12, 12, device=DEVICE)
    labels = torch.tensor([0, 3, 1], device=DEVICE)
    model.eval()
    with torch.no_grad():
        out_c, aux_c = compiled(images)
        out_e, aux_e = model(images)
    assert torch.equal(out_c, out_e) and torch.equal(aux_c, aux_e)
    model.train()
    results = []
    for module in (compiled, model):
        model.zero_grad(set_to_none=True)
        logits, aux = module(images)
        (torch.nn.functional.cross_entropy(logits, labels) + aux).backward()
        results.append([logits, aux] + [p.grad for p in model.parameters()])
    for a, b in zip(*results):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_recipe_compile_field():
    """--set compile=true; the Trainer compiles the training model on CUDA only (raw_model stays
    the plain module for state_dict / checkpoints / evaluation)."""
    from mlit.train.loop import Trainer
    from mlit.train.recipes import apply_overrides, get_recipe

    recipe = get_recipe("table6-cifar10", "XXS")
    assert recipe.compile is False
    recipe = apply_overrides(recipe, {}, ["compile=true"])
    assert recipe.compile is True
    if DEVICE == "cpu":
        trainer = Trainer(recipe.replace(batch_size=8), 10, steps_per_epoch=10)
        assert trainer.compiled is False and trainer.model is trainer.raw_model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_trainer_compile_cuda():
    from mlit.train.loop import Trainer
    from mlit.train.recipes import get_recipe

    recipe = get_recipe("table6-cifar10", "XXS").replace(batch_size=32, lr=2e-3, warmup_epochs=0, augment=False,
                                                          compile=True)
    trainer = Trainer(recipe, 10, steps_per_epoch=100, device="cuda", backend="triton")
    assert trainer.compiled and trainer.model is not trainer.raw_model
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=g).cuda()
    y = torch.randint(0, 10, (32,), generator=g).cuda()
    losses = [trainer.train_step(x, y)["loss"].item() for _ in range(10)]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) < sum(losses[:3]), losses
    assert not any(key.startswith("_orig_mod") for key in trainer.state_dict()["model"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_captures_forward_and_backward():
    """The fused layer's training step (fwd + bwd under fp16 autocast) captured in one CUDA graph:
    without randomness a replay equals eager bit for bit; with gate noise and dropout each replay
    draws fresh values (the seed comes from torch's graph-safe generator)."""
    torch.manual_seed(0)
    layer = SharedSwiGLUMoE(144, 144, 3, backend="triton").cuda().train()
    with torch.no_grad():
        layer.w_gate.normal_(0, 0.1)
        layer.w_noise.normal_(0, 0.1)
    x = torch.randn(4096, 144, device="cuda", requires_grad=True)
    dy = torch.randn(4096, 144, device="cuda")
    one = torch.ones((), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.float16):
            y, aux = layer(x)
        torch.autograd.backward((y, aux), (dy, one))
        return y, aux

    def capture():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: autotuning and allocations outside the capture
            for _ in range(3):
                layer.zero_grad(set_to_none=True)
                x.grad = None
                step()
        torch.cuda.current_stream().wait_stream(side)
        layer.zero_grad(set_to_none=True)
        x.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        return graph, out

    for noisy, dropout in ((False, 0.0), (True, 0.1)):
        layer.noisy_gating, layer.dropout.p = noisy, dropout
        graph, (y_static, aux_static) = capture()
        graph.replay()
        first = [y_static.clone(), aux_static.clone(), x.grad.clone(), layer.w1.grad.clone()]
        graph.replay()
        second = [y_static.clone(), aux_static.clone(), x.grad.clone(), layer.w1.grad.clone()]
        if not noisy:
            layer.zero_grad(set_to_none=True)
            x.grad = None
            y, aux = step()
            torch.cuda.synchronize()
            for a, b in zip(first, [y, aux, x.grad, layer.w1.grad]):
                assert torch.equal(a, b)
            assert all(torch.equal(a, b) for a, b in zip(first, second))
        else:
            assert not torch.equal(first[0], second[0]) and all(torch.isfinite(t).all() for t in first + second)
