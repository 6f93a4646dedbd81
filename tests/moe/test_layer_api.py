"""SharedSwiGLUMoE as a timm-style drop-in MLP: timm's keywords, a tensor out, the auxiliary loss
collected from the model."""

import functools

import pytest
import torch
import torch.nn as nn

from mlit_kernels import SharedSwiGLUMoE, collect_aux_loss


class TimmStyleBlock(nn.Module):
    """The shape of timm's ViT Block: ``mlp_layer(in_features=, hidden_features=, act_layer=,
    norm_layer=, bias=, drop=)`` returning a tensor."""

    def __init__(self, dim, mlp_layer, mlp_ratio=4.0, act_layer=nn.GELU):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = mlp_layer(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                             norm_layer=None, bias=True, drop=0.0)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


def test_timm_block_with_moe_mlp():
    torch.manual_seed(0)
    moe = functools.partial(SharedSwiGLUMoE, num_experts=4, k=2, return_aux=False)
    blocks = nn.Sequential(*[TimmStyleBlock(16, moe, act_layer=nn.SiLU) for _ in range(2)]).train()
    x = torch.randn(3, 5, 16)
    y = blocks(x)
    assert isinstance(y, torch.Tensor) and y.shape == x.shape
    aux = collect_aux_loss(blocks)
    per_layer = [m for m in blocks.modules() if isinstance(m, SharedSwiGLUMoE)]
    assert len(per_layer) == 2 and aux.dim() == 0 and aux.item() > 0
    assert all(m.aux_loss is None for m in per_layer)  # collected and reset
    (y.square().mean() + aux).backward()
    assert all(m.w_gate.grad is not None for m in per_layer)
    assert collect_aux_loss(blocks).item() == 0.0  # nothing ran since


def test_timm_keywords_equal_the_own_names():
    a = SharedSwiGLUMoE(in_features=12, hidden_features=8, num_experts=3, drop=0.2)
    b = SharedSwiGLUMoE(12, 8, 3, dropout=0.2)
    assert (a.dim, a.hidden_dim, a.dropout.p) == (b.dim, b.hidden_dim, b.dropout.p)
    assert a.state_dict().keys() == b.state_dict().keys()
    assert SharedSwiGLUMoE(12, 8, 3).dropout.p == 0.1  # the paper's default


def test_timm_gelu_default_warns_and_bad_keywords_raise():
    with pytest.warns(UserWarning, match="act_layer.*GELU.*not used"):
        SharedSwiGLUMoE(in_features=8, hidden_features=4, num_experts=3, act_layer=nn.GELU)
    with pytest.raises(ValueError, match="out_features"):
        SharedSwiGLUMoE(in_features=8, hidden_features=4, num_experts=3, out_features=6)
    with pytest.raises(ValueError, match="norm_layer"):
        SharedSwiGLUMoE(in_features=8, hidden_features=4, num_experts=3, norm_layer=nn.LayerNorm)
    with pytest.raises(ValueError, match="bias"):
        SharedSwiGLUMoE(in_features=8, hidden_features=4, num_experts=3, bias=False)
    with pytest.raises(ValueError, match="dim=8 and in_features=6 disagree"):
        SharedSwiGLUMoE(8, 4, 3, in_features=6)
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        SharedSwiGLUMoE(in_features=8, hidden_features=4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_need_aux_false_skips_the_balancing_loss(backend):
    """need_aux=False: no aux loss (None; nothing kept with return_aux=False), the same y; in
    evaluation the dense kernels run without their aux launch."""
    from mlit_kernels.common.tiling import interpreting
    from mlit_kernels.meter import Meter

    if backend == "triton" and not (torch.cuda.is_available() or interpreting()):
        pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    moe = SharedSwiGLUMoE(16, 24, 3, k=2, backend=backend, triton_variant="dense").to(device).eval()
    x = torch.randn(2, 7, 16, device=device)
    with torch.no_grad():
        y, aux = moe(x)
        y_skip, none = moe(x, need_aux=False)
        with Meter(dry_run=True) as with_aux:
            moe(x)
        with Meter(dry_run=True) as without:
            moe(x, need_aux=False)
    assert none is None and aux is not None and torch.equal(y, y_skip)
    if backend == "triton":
        aux_kernel = "triton._fused_aux_kernel"
        assert with_aux.by_name()[aux_kernel] == 1 and aux_kernel not in without.by_name()
    timm_style = SharedSwiGLUMoE(16, 24, 3, k=2, backend=backend, return_aux=False).to(device).eval()
    with torch.no_grad():
        timm_style(x, need_aux=False)
    assert timm_style.aux_loss is None
