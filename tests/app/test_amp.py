"""Autocast's weight casts batched (mlit.models.amp): the same values and gradients as autocast's
own per-layer casts, bit for bit, in one launch forward and one backward."""

import torch

from mlit.models import MoETransformer
from mlit.models.amp import autocast_weights
from mlit.config import encoder_config
from mlit_kernels.meter import Meter


def _run(model, x, batched: bool):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(1)  # the same gate noise in both runs
    with torch.autocast("cpu", dtype=torch.float16):
        if batched:
            y, aux = model(x)
        else:  # each attention block casts its own weights (autocast's per-op casts)
            aux = 0.0
            y = x
            for layer in model.layers:
                y, a = layer(y)
                aux = aux + a
    (y.float().square().sum() + aux).backward()
    return y, x.grad, {n: p.grad for n, p in model.named_parameters()}


def test_batched_casts_are_bit_identical_to_autocast():
    torch.manual_seed(0)
    cfg = encoder_config("XXS").replace(depth=3)
    model = MoETransformer(cfg)
    x = torch.randn(2, 13, cfg.embed_dim)
    y1, dx1, g1 = _run(model, x, batched=True)
    y2, dx2, g2 = _run(model, x, batched=False)
    assert y1.dtype == y2.dtype and torch.equal(y1, y2) and torch.equal(dx1, dx2)
    for name, g in g2.items():
        assert (g is None) == (g1[name] is None), name
        assert g is None or (g1[name].dtype == g.dtype == torch.float32 and torch.equal(g1[name], g)), name


def test_one_launch_each_way_and_missing_gradients():
    w = [torch.randn(5, 3, requires_grad=True), torch.randn(3, requires_grad=True), torch.randn(4, requires_grad=True)]
    assert autocast_weights(w, "cpu") is None  # autocast off: the weights stay
    with Meter() as meter, torch.autocast("cpu", dtype=torch.float16):
        cast = autocast_weights(w, "cpu")
        (cast[0].sum() + cast[1].sum()).backward()  # the third one unused
    assert [c.dtype for c in cast] == [torch.float16] * 3
    assert all(torch.equal(c, p.half()) for c, p in zip(cast, w))
    assert w[0].grad.dtype == torch.float32 and torch.equal(w[0].grad, torch.ones(5, 3))
    assert w[2].grad is None
    assert meter.by_name()["aten._foreach_copy_"] == 2 and "aten._to_copy" not in meter.by_name()
    with torch.autocast("cpu", dtype=torch.float16):
        assert autocast_weights([w[0].double()], "cpu") is None  # not fp32: left to autocast
