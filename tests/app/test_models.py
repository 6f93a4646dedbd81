"""The paper's models: configurations, GQA, the mLiT encoder and classifier, the mmLiT MAE."""

import pytest
import torch
import torch.nn.functional as F

from mlit.config import DECODER, ENCODERS, PAPER_PARAMS, TransformerConfig, encoder_config
from mlit.models import GroupedQueryAttention, MLiTClassifier, MMLiT, patchify, random_masking
from mlit.params import parameter_table

TINY = TransformerConfig("tiny", embed_dim=24, depth=3, hidden_first=12, hidden_last=6, num_heads=4, num_groups=2)


def test_depthwise_hidden_sizes_and_expert_stages_follow_eq15():
    assert [ENCODERS["S"].hidden_dim(i) for i in range(15)] == [
        144, 138, 133, 128, 123, 118, 113, 108, 102, 97, 92, 87, 82, 77, 72
    ]
    assert [ENCODERS["XS"].hidden_dim(i) for i in range(12)] == [96, 90, 84, 78, 72, 66, 61, 55, 49, 43, 37, 32]
    assert [ENCODERS["XXS"].hidden_dim(i) for i in range(9)] == [81, 74, 67, 60, 54, 47, 40, 33, 27]
    assert [ENCODERS["XXS"].num_experts(i) for i in range(9)] == [3, 3, 3, 4, 4, 4, 5, 5, 5]
    assert [DECODER.hidden_dim(i) for i in range(4)] == [72] * 4


@pytest.mark.parametrize("row", parameter_table(), ids=lambda r: f"{r.model}-{r.part}")
def test_parameter_counts_within_two_percent_of_the_paper(row):
    if row.paper_millions is not None:
        assert abs(row.deviation) <= 0.02, f"{row.model} {row.part}: {row.count} vs {row.paper_millions}M"


def test_parameter_table_covers_every_size():
    rows = parameter_table()
    assert {r.model for r in rows} == set(ENCODERS)
    assert sum(r.paper_millions is not None for r in rows) == 3 * len(ENCODERS)
    assert PAPER_PARAMS["decoder"] == 0.34


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model size 'M'"):
        encoder_config("M")


def test_gqa_with_one_head_per_group_is_multi_head_attention():
    torch.manual_seed(0)
    attn = GroupedQueryAttention(24, num_heads=4, num_groups=4)
    x = torch.randn(2, 5, 24)
    q, k, v = attn.qkv(x).split(24, dim=-1)
    heads = lambda t: t.view(2, 5, 4, 6).transpose(1, 2)  # noqa: E731
    scores = heads(q) @ heads(k).transpose(-1, -2) / 6**0.5
    out = (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(2, 5, 24)
    torch.testing.assert_close(attn(x), attn.proj(out), atol=1e-6, rtol=1e-5)


def test_gqa_heads_of_a_group_share_keys_and_values():
    attn = GroupedQueryAttention(24, num_heads=4, num_groups=2)
    assert attn.qkv.out_features == 24 + 2 * 2 * 6
    with torch.no_grad():  # queries equal within each group → equal outputs within each group
        attn.qkv.weight[6:12] = attn.qkv.weight[0:6]
        attn.qkv.bias[6:12] = attn.qkv.bias[0:6]
        attn.proj.weight.copy_(torch.eye(24))
        attn.proj.bias.zero_()
    out = attn(torch.randn(1, 5, 24)).view(1, 5, 4, 6)
    torch.testing.assert_close(out[:, :, 0], out[:, :, 1])
    assert not torch.allclose(out[:, :, 1], out[:, :, 2])


def test_patchify_orders_values_row_by_row():
    images = torch.arange(2 * 3 * 36 * 36, dtype=torch.float32).view(2, 3, 36, 36)
    patches = patchify(images, 3)
    assert patches.shape == (2, 144, 27)
    assert torch.equal(patches[1, 13].view(3, 3, 3).permute(2, 0, 1), images[1, :, 3:6, 3:6])


def test_classifier_reads_the_dummy_token():
    torch.manual_seed(0)
    model = MLiTClassifier(TINY, num_classes=7).eval()
    images = torch.randn(3, 3, 36, 36)
    logits, aux = model(images)
    assert logits.shape == (3, 7) and aux.dim() == 0
    features, _ = model.encoder(images)
    assert features.shape == (3, 145, 24)
    torch.testing.assert_close(logits, model.head(features[:, 144]))
    with pytest.raises(ValueError, match="images must have shape"):
        model(torch.randn(3, 3, 32, 32))


def test_dummy_patch_is_zero_so_its_token_is_the_position_alone():
    model = MLiTClassifier(TINY, num_classes=3)
    tokens = model.encoder.embed(torch.randn(2, 3, 36, 36))
    torch.testing.assert_close(tokens[:, 144], model.encoder.pos_embed[0, 144].expand(2, -1))


def test_random_masking_keeps_exactly_36_of_144():
    keep, mask = random_masking(5, 144, 36, torch.device("cpu"))
    assert keep.shape == (5, 36)
    assert mask.sum(1).tolist() == [108.0] * 5
    for row in range(5):
        assert len(set(keep[row].tolist())) == 36
        assert mask[row, keep[row]].sum() == 0


def test_mae_encoder_sees_36_patches_plus_the_dummy():
    model = MMLiT(TINY, decoder_cfg=TINY.replace(depth=1, experts_per_stage=(3,)))
    seen = []
    model.encoder.blocks.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape))
    out = model(torch.randn(2, 3, 36, 36))
    assert seen == [torch.Size([2, 37, 24])]
    assert out.pred.shape == (2, 144, 27) and out.mask.shape == (2, 144)
    dummy_embedding = model.encoder.pos_embed[0, 144]  # the dummy stays visible: its token enters the encoder
    assert out.mask.sum().item() == 2 * 108 and dummy_embedding.requires_grad


def test_mae_loss_is_eq16_with_alpha_and_beta():
    torch.manual_seed(0)
    model = MMLiT(TINY, decoder_cfg=TINY.replace(depth=1, experts_per_stage=(3,)), alpha=0.1, beta=0.5)
    images = torch.randn(2, 3, 36, 36)
    pred = torch.randn(2, 144, 27)
    _, mask = random_masking(2, 144, 36, torch.device("cpu"))
    moe = torch.tensor(0.3)
    out = model.loss(images, pred, mask, moe)
    err = ((pred - patchify(images, 3)) ** 2).mean(-1)
    masked, unmasked = err[mask == 1].mean(), err[mask == 0].mean()
    torch.testing.assert_close(out.masked_mse, masked)
    torch.testing.assert_close(out.unmasked_mse, unmasked)
    torch.testing.assert_close(out.loss, masked + 0.1 * unmasked + 0.5 * moe)
    model.alpha, model.beta = 0.0, 2.0
    torch.testing.assert_close(model.loss(images, pred, mask, moe).loss, masked + 2.0 * moe)


def test_mae_backward_reaches_encoder_decoder_and_mask_token():
    model = MMLiT(TINY, decoder_cfg=TINY.replace(depth=1, experts_per_stage=(3,)))
    model(torch.randn(2, 3, 36, 36)).loss.backward()
    for name in ("mask_token", "decoder_pos_embed", "encoder.pos_embed", "decoder_pred.weight", "encoder.patch_embed.weight"):
        assert model.get_parameter(name).grad.abs().sum() > 0, name


def test_decoder_position_table_is_an_option():
    with_table = MMLiT(TINY)
    without = MMLiT(TINY, decoder_pos_embed=False)
    assert without.decoder_pos_embed is None
    diff = sum(p.numel() for p in with_table.parameters()) - sum(p.numel() for p in without.parameters())
    assert diff == 145 * DECODER.embed_dim
    assert without(torch.randn(1, 3, 36, 36)).loss.isfinite()


def test_encoder_eval_is_deterministic():
    model = MLiTClassifier(ENCODERS["XXS"], 10).eval()
    images = torch.randn(2, 3, 36, 36)
    a, _ = model(images)
    b, _ = model(images)
    assert torch.equal(a, b)
    model.train()
    c, _ = model(images)
    assert not torch.equal(a, c)  # dropout and gate noise in training


def test_classifier_trains_on_a_tiny_problem():
    torch.manual_seed(0)
    model = MLiTClassifier(TINY, num_classes=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    images = torch.randn(16, 3, 36, 36)
    labels = (images.mean((1, 2, 3)) > 0).long()
    first = None
    for _ in range(30):
        logits, aux = model(images)
        loss = F.cross_entropy(logits, labels) + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.5 * first


def _attention_reference(attn, x):
    """Grouped-query attention written out: k and v heads repeated for their query heads."""
    B, n, dim = x.shape
    h, g, d = attn.num_heads, attn.num_groups, attn.head_dim
    q, k, v = attn.qkv(x).split([dim, g * d, g * d], dim=-1)
    q, k, v = (t.view(B, n, -1, d).transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(h // g, dim=1) for t in (k, v))
    return attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, n, dim))


@pytest.mark.parametrize("dim,heads,groups", [(108, 6, 3), (128, 8, 4), (54, 2, 2), (48, 4, 1)])
@pytest.mark.parametrize("pad", [False, True])
def test_gqa_equals_repeated_heads_with_gradients(dim, heads, groups, pad):
    """Native GQA and the zero-padded head dims (18 → 24, 27 → 32) change neither the output nor
    the gradients against the written-out attention."""
    torch.manual_seed(0)
    attn = GroupedQueryAttention(dim, heads, groups, pad_head_dim=pad).double()
    x = torch.randn(2, 9, dim, dtype=torch.float64, requires_grad=True)
    out = attn(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *attn.parameters()])
    ref = _attention_reference(attn, x)
    grads_ref = torch.autograd.grad(ref.square().sum(), [x, *attn.parameters()])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_set_backend_switches_every_moe_layer():
    model = MLiTClassifier(TINY, num_classes=3)
    model.encoder.blocks.set_backend("auto")
    assert {layer.moe.backend for layer in model.encoder.blocks.layers} == {"auto"}
    with pytest.raises(ValueError, match="backend"):
        model.encoder.blocks.set_backend("fast")
