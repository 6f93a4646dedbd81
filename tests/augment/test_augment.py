"""GPUAugment: shapes, eval path, per-sample randomness, exact ops, published AutoAugment policies, seeding;
the Triton kernels against the torch path, their launch and sync counts."""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mlit.data import GPUAugment
from mlit_kernels.augment.reference import NO_OP, OPS, apply_ops, magnitude_bins

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Cubuk et al. 2019 (AutoAugment), appendix; identical to torchvision's AutoAugmentPolicy tables.
PUBLISHED = {
    "cifar10": [
        (("Invert", 0.1, None), ("Contrast", 0.2, 6)), (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
        (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)), (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)), (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
        (("Color", 0.4, 3), ("Brightness", 0.6, 7)), (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
        (("Equalize", 0.6, None), ("Equalize", 0.5, None)), (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
        (("Color", 0.7, 7), ("TranslateX", 0.5, 8)), (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
        (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)), (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
        (("Solarize", 0.5, 2), ("Invert", 0.0, None)), (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
        (("Equalize", 0.2, None), ("Equalize", 0.6, None)), (("Color", 0.9, 9), ("Equalize", 0.6, None)),
        (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)), (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
        (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)), (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
        (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)), (("Equalize", 0.8, None), ("Invert", 0.1, None)),
        (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
    ],
    "svhn": [
        (("ShearX", 0.9, 4), ("Invert", 0.2, None)), (("ShearY", 0.9, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.6, None), ("Solarize", 0.6, 6)), (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Equalize", 0.6, None), ("Rotate", 0.9, 3)), (("ShearX", 0.9, 4), ("AutoContrast", 0.8, None)),
        (("ShearY", 0.9, 8), ("Invert", 0.4, None)), (("ShearY", 0.9, 5), ("Solarize", 0.2, 6)),
        (("Invert", 0.9, None), ("AutoContrast", 0.8, None)), (("Equalize", 0.6, None), ("Rotate", 0.9, 3)),
        (("ShearX", 0.9, 4), ("Solarize", 0.3, 3)), (("ShearY", 0.8, 8), ("Invert", 0.7, None)),
        (("Equalize", 0.9, None), ("TranslateY", 0.6, 6)), (("Invert", 0.9, None), ("Equalize", 0.6, None)),
        (("Contrast", 0.3, 3), ("Rotate", 0.8, 4)), (("Invert", 0.8, None), ("TranslateY", 0.0, 2)),
        (("ShearY", 0.7, 6), ("Solarize", 0.4, 8)), (("Invert", 0.6, None), ("Rotate", 0.8, 4)),
        (("ShearY", 0.3, 7), ("TranslateX", 0.9, 3)), (("ShearX", 0.1, 6), ("Invert", 0.6, None)),
        (("Solarize", 0.7, 2), ("TranslateY", 0.6, 7)), (("ShearY", 0.8, 4), ("Invert", 0.8, None)),
        (("ShearX", 0.7, 9), ("TranslateY", 0.8, 3)), (("ShearY", 0.8, 5), ("AutoContrast", 0.7, None)),
        (("ShearX", 0.7, 2), ("Invert", 0.1, None)),
    ],
}


def images(b=16, size=32, seed=0):
    """Smooth random uint8 images (B, 3, size, size) with some noise, like photos."""
    g = torch.Generator().manual_seed(seed)
    smooth = F.interpolate(torch.rand(b, 3, 5, 5, generator=g) * 255, size=size, mode="bilinear")
    return (smooth + 12 * torch.randn(b, 3, size, size, generator=g)).clamp(0, 255).round().to(torch.uint8)


def to_uint8_range(out):
    return ((out + 1) * 127.5).round()


def op(name, b):
    return torch.full((b,), OPS.index(name))


@pytest.mark.parametrize("policy", [None, "cifar10", "svhn"])
@pytest.mark.parametrize("size", [28, 32, 36])
def test_shape_dtype_range(policy, size):
    out = GPUAugment(autoaugment=policy)(images(32, size))
    assert out.shape == (32, 3, 36, 36) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert ((out + 1) * 127.5 - to_uint8_range(out)).abs().max() < 1e-3  # on the 256-level grid


def test_eval_is_resize_and_normalise():
    aug = GPUAugment(train=False)
    for size in (28, 32):
        x = images(8, size)
        ref = F.interpolate(x.float(), size=(36, 36), mode="bilinear", align_corners=False).round() / 127.5 - 1
        state = torch.get_rng_state()
        assert torch.equal(aug(x), ref) and torch.equal(aug(x), ref)
        assert torch.equal(torch.get_rng_state(), state)  # consumes no randomness
    x = images(4, 36)
    assert torch.equal(aug(x), x.float() / 127.5 - 1)
    assert torch.equal(aug(x), (x.float() / 255 - 0.5) / 0.5)


def test_train_without_crop_or_flip_matches_eval():
    x = images(16, 32)
    train = GPUAugment(crop_scale=(1.0, 1.0), hflip=0.0)(x)
    ev = GPUAugment(train=False)(x)
    diff = (train - ev).abs()
    assert diff.max() <= 1 / 127.5 + 1e-6 and (diff > 0).float().mean() < 0.01  # bilinear ties only


def test_flip_is_exact():
    x = images(8, 36)
    flipped = GPUAugment(crop_scale=(1.0, 1.0), hflip=1.0)(x)
    assert torch.equal(to_uint8_range(flipped), torch.flip(x, dims=[-1]).float())
    same = GPUAugment(crop_scale=(1.0, 1.0), hflip=0.0)(x)
    assert torch.equal(to_uint8_range(same), x.float())


def test_per_sample_randomness():
    x = images(1, 32).expand(64, -1, -1, -1).contiguous()
    for policy in (None, "cifar10", "svhn"):
        torch.manual_seed(0)
        out = GPUAugment(autoaugment=policy)(x).flatten(1)
        assert torch.unique(out, dim=0).shape[0] >= 60, policy


def test_crop_flip_statistics():
    """About half the images are flipped; crops cover 0.8..1 of the area (only flips keep symmetry)."""
    row = torch.arange(36, dtype=torch.uint8).mul(7).view(1, 1, 1, 36).expand(2000, 3, 36, 36).contiguous()
    torch.manual_seed(0)
    out = to_uint8_range(GPUAugment(crop_scale=(0.8, 1.0))(row))
    flipped = (out[:, 0, 18, 0] > out[:, 0, 18, -1]).float().mean()
    assert 0.45 < flipped < 0.55
    span = (out[:, 0, 18, 0] - out[:, 0, 18, -1]).abs() / (35 * 7)  # crop width / 36, nearly
    assert span.min() > 0.8 ** 0.5 * 0.75 and span.max() <= 1.0


def test_seeded_runs_reproduce():
    x = images(32, 32)
    aug = GPUAugment(autoaugment="cifar10")
    torch.manual_seed(123)
    a = aug(x)
    torch.manual_seed(123)
    b = aug(x)
    state = torch.get_rng_state()
    c = aug(x)
    torch.set_rng_state(state)
    d = aug(x)
    assert torch.equal(a, b) and torch.equal(c, d) and not torch.equal(a, c)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(aug(x, generator=g1), aug(x, generator=g2))


def test_policies_are_the_published_ones():
    bins = magnitude_bins(36)
    for name, published in PUBLISHED.items():
        aug = GPUAugment(autoaugment=name)
        assert [tuple(sub) for sub in aug.policy] == [tuple(sub) for sub in published]
        ops, probs, mags, signed = aug._policy_tables(torch.device("cpu"))[:4]  # the tables actually used
        for s, sub in enumerate(published):
            for k, (op_name, p, b) in enumerate(sub):
                assert OPS[ops[s, k]] == op_name and probs[s, k].item() == pytest.approx(p)
                assert mags[s, k].item() == bins[OPS.index(op_name), b or 0].item()
                assert signed[s, k].item() == (OPS.index(op_name) < 9)


def test_magnitude_bins_are_torchvisions():
    bins = magnitude_bins(36)
    row = lambda name: bins[OPS.index(name)].tolist()  # noqa: E731
    assert row("ShearX")[9] == pytest.approx(0.3) and row("ShearY")[3] == pytest.approx(0.1)
    assert row("TranslateX")[9] == pytest.approx(150 / 331 * 36) and row("Rotate")[9] == pytest.approx(30)
    assert row("Color")[9] == pytest.approx(0.9)
    assert row("Posterize") == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    assert row("Solarize")[0] == 255 and row("Solarize")[9] == 0 and row("Solarize")[2] == pytest.approx(255 * 7 / 9)
    assert row("Invert") == [0] * 10


def test_probability_gates_and_order():
    """A custom one-sub-policy table: p=1 applies, p=0 skips, and the two ops run in order."""
    x = images(16, 32)
    cases = (((("Invert", 1.0, None), ("Invert", 0.0, None)), lambda v: 255 - v),
             ((("Invert", 1.0, None), ("Invert", 1.0, None)), lambda v: v),
             ((("Posterize", 1.0, 8), ("Invert", 1.0, None)), lambda v: 255 - v // 16 * 16))  # bin 8: 4 bits
    for sub, expected in cases:
        aug = GPUAugment(autoaugment="cifar10")
        aug.policy = (sub,)
        torch.manual_seed(7)
        out = to_uint8_range(aug(x))
        torch.manual_seed(7)  # the same crops and flips without AutoAugment
        plain = to_uint8_range(GPUAugment(autoaugment=None)(x))
        assert torch.equal(out, expected(plain)), sub


# --- the ops themselves, on integer-valued float images ------------------------------------------


def test_no_op_and_batched_selection():
    x = (images(len(OPS) + 1, 36).float() * 0.6 + 20).round()  # not full range: autocontrast changes it
    ops = torch.tensor(list(range(len(OPS))) + [NO_OP])
    mags = torch.tensor([0.2, -0.2, 5.0, -3.0, 20.0, 0.5, -0.5, 0.7, 0.9, 5.0, 128.0, 0, 0, 0, 0])
    out = apply_ops(x, ops, mags)
    assert torch.equal(out[-1], x[-1])
    for i in range(len(OPS)):  # each image as if alone in its batch
        assert torch.equal(out[i], apply_ops(x[i:i + 1], ops[i:i + 1], mags[i:i + 1])[0])
        assert not torch.equal(out[i], x[i]), OPS[i]


def test_intensity_ops_exact():
    x = images(4, 36).float()
    m = lambda v: torch.full((4,), float(v))  # noqa: E731
    assert torch.equal(apply_ops(x, op("Invert", 4), m(0)), 255 - x)
    assert torch.equal(apply_ops(x, op("Solarize", 4), m(128)), torch.where(x >= 128, 255 - x, x))
    assert torch.equal(apply_ops(x, op("Posterize", 4), m(3)), (x.to(torch.uint8) & 0b11100000).float())
    assert torch.equal(apply_ops(x, op("Brightness", 4), m(-1)), torch.zeros_like(x))
    assert torch.equal(apply_ops(x, op("Brightness", 4), m(0.5)), (1.5 * x).clamp(0, 255).floor())
    grey = (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).floor()
    assert torch.equal(apply_ops(x, op("Color", 4), m(-1)), grey[:, None].expand_as(x))
    mean = grey.mean((1, 2))[:, None, None, None]
    assert (apply_ops(x, op("Contrast", 4), m(-1)) - mean.floor().expand_as(x)).abs().max() <= 1
    sharp = apply_ops(x, op("Sharpness", 4), m(-1))  # fully blurred inside, borders untouched
    assert torch.equal(sharp[..., 0, :], x[..., 0, :]) and torch.equal(sharp[..., :, -1], x[..., :, -1])
    inner = (F.avg_pool2d(x, 3, 1) * 9 + 4 * x[..., 1:-1, 1:-1]) / 13
    assert torch.equal(sharp[..., 1:-1, 1:-1], inner.round())


def test_autocontrast_and_equalize_match_reference():
    x = images(6, 36).float() * 0.5 + 40  # a narrow range
    x = x.round()
    x[0, 1] = 99  # a flat channel stays as it is
    auto = apply_ops(x, op("AutoContrast", 6), torch.zeros(6))
    lo, hi = x.amin((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)
    ref = torch.where(hi > lo, ((x - lo) * (255 / (hi - lo).clamp(min=1))).clamp(0, 255).floor(), x)
    assert torch.equal(auto, ref)
    assert torch.equal(auto[0, 1], x[0, 1])

    def equalize_channel(c):  # torchvision's algorithm (PIL's ImageOps.equalize)
        c = c.astype(np.int64)
        hist = np.bincount(c.ravel(), minlength=256)
        step = (hist.sum() - hist[c.max()]) // 255
        if step == 0:
            return c
        lut = np.concatenate([[0], (np.cumsum(hist) + step // 2) // step])[:-1].clip(0, 255)
        return lut[c]

    eq = apply_ops(x, op("Equalize", 6), torch.zeros(6))
    ref = np.stack([[equalize_channel(ch) for ch in img] for img in x.numpy()])
    assert np.array_equal(eq.numpy(), ref)


def test_geometric_ops_exact():
    x = images(2, 36).float()
    m = lambda v: torch.full((2,), float(v))  # noqa: E731
    right = apply_ops(x, op("TranslateX", 2), m(5.7))  # int(5.7) = 5 pixels, black fill
    assert torch.equal(right[..., 5:], x[..., :-5]) and right[..., :5].abs().sum() == 0
    up = apply_ops(x, op("TranslateY", 2), m(-3))
    assert torch.equal(up[..., :-3, :], x[..., 3:, :]) and up[..., -3:, :].abs().sum() == 0
    assert torch.equal(apply_ops(x, op("Rotate", 2), m(90)), torch.rot90(x, 1, dims=(2, 3)))  # counter-clockwise
    sheared = apply_ops(x, op("ShearX", 2), m(0.3))  # src x = x + 0.3 * y about the top-left corner
    for i in (0, 10, 35):
        shift = round(0.3 * (i + 0.5))
        assert torch.equal(sheared[..., i, : 36 - shift], x[..., i, shift:])
        assert sheared[..., i, 36 - shift:].abs().sum() == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown AutoAugment policy 'imagenet'"):
        GPUAugment(autoaugment="imagenet")
    with pytest.raises(ValueError, match="crop_scale"):
        GPUAugment(crop_scale=(0.0, 1.0))
    with pytest.raises(ValueError, match=r"expected uint8 images \(B, 3, H, W\), got torch.float32"):
        GPUAugment()(torch.zeros(2, 3, 32, 32))


# --- the Triton kernels (3 launches a call) against the torch path ---------------------------


def _interpreting() -> bool:
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


needs_triton = pytest.mark.skipif(not _interpreting(), reason="no CUDA and TRITON_INTERPRET is not set")


def _exact_on_this_device() -> bool:
    """Whether the kernels must match the torch path bit for bit here: on the CPU, through an
    interpreter whose ``tl.fma`` rounds once. Triton's interpreter before 3.9 computed ``tl.fma``
    as ``x * y + z`` (two roundings; a GPU's fma rounds once, as torch's CPU grid_sample does), so
    a bilinear sample that lands on a .5 tie can round to the neighbouring integer there."""
    if DEVICE != "cpu":
        return False
    import triton
    import triton.language as tl

    @triton.jit
    def fma_kernel(out_ptr):
        a = 1.0 + 1.0 / 4096.0  # a * a = 1 + 2^-11 + 2^-24: its last bit is lost when rounded alone
        tl.store(out_ptr, tl.fma(tl.full((), a, tl.float32), tl.full((), a, tl.float32), -1.0))

    out = torch.zeros(1)
    fma_kernel[(1,)](out)
    return out.item() == 2.0**-11 + 2.0**-24


def assert_same_images(out: torch.Tensor, ref: torch.Tensor, ops: torch.Tensor | None = None) -> None:
    """Bit for bit where the arithmetic is the torch path's (``_exact_on_this_device``); elsewhere
    CUDA's grid_sample and a twice-rounding interpreter fma round differently in rare ties (a
    sample rounds to the neighbouring grey level; crop boxes stay exact: tests/checks/test_gpu_hazards.py):
    at most 0.2% of the values may differ. ``ops`` (one per image) names the ops of the images that differ in the message."""
    if _exact_on_this_device():
        differ = (out != ref).flatten(1).any(1)
        assert not differ.any(), [OPS[int(i)] for i in ops[differ]] if ops is not None else differ.nonzero()
    else:
        assert ((out - ref).abs() > 1e-6).float().mean() < 2e-3


@needs_triton
def test_comparison_is_bit_for_bit_on_the_pinned_interpreter():
    """From Triton 3.9 the interpreter's fma rounds once, so the CPU comparisons below are exact."""
    import triton

    if DEVICE != "cpu" or tuple(map(int, triton.__version__.split(".")[:2])) < (3, 9):
        pytest.skip(f"exact only through Triton >= 3.9's interpreter (here {triton.__version__} on {DEVICE})")
    assert _exact_on_this_device()


@needs_triton
@pytest.mark.parametrize("policy,size", [(None, 32), ("cifar10", 28), ("cifar10", 36), ("svhn", 32)])
def test_triton_transform_is_the_torch_transform(policy, size):
    """Same draws, same images, bit for bit (the kernels round as the torch path does; see
    ``assert_same_images`` for where rounding legitimately differs)."""
    x = images(24, size, seed=3).to(DEVICE)
    torch.manual_seed(11)
    ref = GPUAugment(autoaugment=policy, backend="reference")(x)
    torch.manual_seed(11)
    out = GPUAugment(autoaugment=policy, backend="triton")(x)
    assert_same_images(out, ref)


@needs_triton
def test_triton_ops_are_apply_ops():
    """Every op at several magnitude bins and both signs, each image its own op."""
    from mlit_kernels.augment.ops import fused_apply_ops

    x = images(len(OPS) * 2, 36, seed=5).float()
    bins = magnitude_bins(36)
    for b in (0, 3, 9):
        ops = torch.arange(len(OPS)).repeat(2)
        sign = torch.where(torch.arange(2 * len(OPS)) < len(OPS), 1.0, -1.0)
        mags = bins[ops, b] * torch.where(ops < 9, sign, 1.0)
        ops = torch.where(torch.arange(2 * len(OPS)) == 3, NO_OP, ops)  # one image left unchanged
        ref = apply_ops(x, ops, mags)
        out = fused_apply_ops(x.to(DEVICE), ops.to(DEVICE), mags.to(DEVICE)).cpu()
        assert_same_images(out, ref, ops)


@needs_triton
@pytest.mark.parametrize("policy", [None, "cifar10"])
def test_augmentation_launches_and_syncs(policy):
    """Budget: <= 20 launches a call (counted, Triton kernels not run) and no host sync, the
    first call included once the tables are prepared."""
    from mlit_kernels.meter import Meter

    x = images(8, 32).to(DEVICE)
    aug = GPUAugment(autoaugment=policy, backend="triton").prepare(DEVICE)
    for _ in range(2):
        with Meter(dry_run=True) as meter:
            aug(x)
        assert meter.syncs == 0 and meter.launches <= 20, meter.table()
    assert meter.launches == (2 if policy is None else 4)
    with Meter() as meter:  # the torch path has no sync either, even when it builds its tables
        GPUAugment(autoaugment=policy, backend="reference")(x)
    assert meter.syncs == 0


def test_backend_choice(monkeypatch):
    """"auto": the kernels on CUDA once cleared there (MLIT_UNCLEARED_KERNELS=1 until then)."""
    monkeypatch.delenv("MLIT_UNCLEARED_KERNELS", raising=False)
    aug = GPUAugment(autoaugment="cifar10")
    assert aug.backend == "auto" and not aug.uses_triton(torch.device("cpu")) and not aug.uses_triton("cuda")
    assert GPUAugment(backend="triton").uses_triton("cuda")
    monkeypatch.setenv("MLIT_UNCLEARED_KERNELS", "1")
    assert aug.uses_triton(torch.device("cuda")) and not aug.uses_triton(torch.device("cpu"))
    assert not GPUAugment(train=False, backend="triton").uses_triton(torch.device("cuda"))
    with pytest.raises(ValueError, match="backend must be one of"):
        GPUAugment(backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_ops():
    x = images(64, 32)
    out = GPUAugment(autoaugment="svhn")(x.cuda())
    assert out.device.type == "cuda" and out.shape == (64, 3, 36, 36)
    ops = torch.arange(64) % (len(OPS) + 1) - 1
    mags = magnitude_bins(36)[ops.clamp(min=0), 5] * torch.where(torch.arange(64) % 2 == 0, 1.0, -1.0)
    mags = torch.where(ops < 9, mags, mags.abs())  # unsigned ops
    xs = F.interpolate(x.float(), size=36).round()
    cpu, gpu = apply_ops(xs, ops, mags), apply_ops(xs.cuda(), ops.cuda(), mags.cuda()).cpu()
    assert (cpu != gpu).float().mean() < 1e-3  # nearest-neighbour ties may round differently


def test_kernel_op_indices_match_the_op_table():
    from mlit_kernels.augment import kernels as K

    names = {"_SHEAR_X": "ShearX", "_SHEAR_Y": "ShearY", "_TRANSLATE_X": "TranslateX", "_TRANSLATE_Y": "TranslateY",
             "_ROTATE": "Rotate", "_BRIGHTNESS": "Brightness", "_COLOR": "Color", "_CONTRAST": "Contrast",
             "_SHARPNESS": "Sharpness", "_POSTERIZE": "Posterize", "_SOLARIZE": "Solarize",
             "_AUTOCONTRAST": "AutoContrast", "_EQUALIZE": "Equalize", "_INVERT": "Invert"}
    for constant, op in names.items():
        assert getattr(K, constant) == OPS.index(op), constant


def test_crop_ratio_polynomial_is_exp():
    """The crop's aspect ratio (no exp: its rounding differs by device) is exp within one ulp over
    the whole log-ratio range, ends included."""
    from mlit_kernels.augment.crop_ratio import LOG_RATIO, exp_taylor

    z = LOG_RATIO[0] + LOG_RATIO[1] * torch.cat([torch.linspace(0, 1, 200_001), torch.rand(200_000)])
    p = exp_taylor(z)
    ulp = torch.nextafter(p, torch.tensor(float("inf"))) - p
    assert ((p.double() - z.double().exp()).abs() / ulp.double()).max() < 1.0
