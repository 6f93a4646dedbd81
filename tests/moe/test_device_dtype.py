"""torch.nn's factory keywords: every public module creates its parameters where and as asked
(``device="meta"`` allocates nothing; ``dtype`` gives every parameter that dtype, no copy)."""

import pytest
import torch

from mlit.config import TransformerConfig
from mlit.models import GroupedQueryAttention, MLiTClassifier, MLiTEncoder, MMLiT, MoETransformer
from mlit_kernels import SharedSwiGLUMoE

TINY = TransformerConfig("tiny", embed_dim=24, depth=3, hidden_first=12, hidden_last=6, num_heads=4, num_groups=2)

MODULES = {
    "moe": lambda **f: SharedSwiGLUMoE(24, 12, 4, k=2, **f),
    "moe_unshared": lambda **f: SharedSwiGLUMoE(24, 12, 4, k=2, shared=("w1", "w2"), **f),
    "gqa": lambda **f: GroupedQueryAttention(24, 4, 2, **f),
    "transformer": lambda **f: MoETransformer(TINY, **f),
    "encoder": lambda **f: MLiTEncoder(TINY, **f),
    "classifier": lambda **f: MLiTClassifier(TINY, num_classes=5, **f),
    "mmlit": lambda **f: MMLiT(TINY, decoder_cfg=TINY.replace(depth=1, experts_per_stage=(3,)), **f),
}


@pytest.mark.parametrize("name", MODULES)
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16, torch.float64])
def test_parameters_are_created_on_the_device_and_dtype_asked(name, dtype):
    module = MODULES[name](device="meta", dtype=dtype)
    params = list(module.parameters())
    assert params and all(p.is_meta for p in params)
    assert {p.dtype for p in params} == {dtype or torch.get_default_dtype()}


@pytest.mark.parametrize("name", MODULES)
def test_meta_module_materialises_with_to_empty_and_reset(name):
    """The deferred-init path (timm, FSDP): build on meta, to_empty, then initialise."""
    module = MODULES[name](device="meta").to_empty(device="cpu")
    for sub in module.modules():
        if hasattr(sub, "reset_parameters"):
            sub.reset_parameters()
    for moe in (m for m in module.modules() if isinstance(m, SharedSwiGLUMoE)):
        assert torch.equal(moe.w_gate, torch.zeros_like(moe.w_gate))
        assert all(p.abs().max() <= 1 / moe.dim**0.5 for p in (moe.w1, moe.b1, moe.v, moe.b_v))


def test_moe_init_is_the_same_with_and_without_factory_keywords():
    torch.manual_seed(0)
    plain = SharedSwiGLUMoE(24, 12, 4)
    torch.manual_seed(0)
    placed = SharedSwiGLUMoE(24, 12, 4, device="cpu", dtype=torch.float32)
    for (name, a), b in zip(plain.state_dict().items(), placed.state_dict().values()):
        assert torch.equal(a, b), name


def test_bfloat16_moe_runs_in_its_dtype():
    moe = SharedSwiGLUMoE(24, 12, 4, dtype=torch.bfloat16)
    y, aux_loss = moe(torch.randn(2, 5, 24, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and aux_loss.dim() == 0
    (y.float().sum() + aux_loss).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in moe.parameters())


def test_integer_dtype_is_a_clear_error():
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype, got torch.int32"):
        SharedSwiGLUMoE(24, 12, 4, dtype=torch.int32)
