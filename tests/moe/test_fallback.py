"""The layer's first-use check of its Triton kernels, the fallback to the reference with one
warning naming the cause, and MLIT_MOE_BACKEND forcing a backend. The check runs on CUDA only;
here it is switched on for CPU tensors (Triton's interpreter) and the kernels are broken on purpose."""

import os
import warnings

if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from mlit_kernels import SharedSwiGLUMoE, functional, selfcheck  # noqa: E402
from mlit_kernels.common.tiling import interpreting  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("no CUDA and Triton kernels were imported without TRITON_INTERPRET=1", allow_module_level=True)


@pytest.fixture(autouse=True)
def checked(monkeypatch):
    """The first-use check on for every device; fresh results; no MLIT_MOE_BACKEND."""
    monkeypatch.setattr(selfcheck, "should_check", lambda x: True)
    monkeypatch.delenv("MLIT_MOE_BACKEND", raising=False)
    selfcheck.reset_first_use_checks()
    yield
    selfcheck.reset_first_use_checks()


def layer(**kwargs):
    torch.manual_seed(0)
    moe = SharedSwiGLUMoE(16, 27, 5, k=2, dropout=0.0, backend="triton", **kwargs).to(DEVICE)
    with torch.no_grad():
        moe.w_gate.normal_(0, 0.3)
    return moe.eval()


def reference_of(moe, x):
    moe_ref = SharedSwiGLUMoE(16, 27, 5, k=2, dropout=0.0, shared=moe.shared).to(DEVICE).eval()
    moe_ref.load_state_dict(moe.state_dict())
    return moe_ref(x)[0]


def count_calls(monkeypatch, wrong=None, error=None):
    """Wrap moe_triton: count calls; scale y by ``wrong`` or raise ``error``."""
    calls = []
    real = functional.moe_triton

    def fake(*args, **kwargs):
        calls.append(1)
        if error is not None:
            raise error
        y, aux = real(*args, **kwargs)
        return (y * wrong if wrong is not None else y), aux

    monkeypatch.setattr(functional, "moe_triton", fake)
    return calls


@pytest.mark.parametrize("shared", [("v", "w2"), ()], ids=["shared", "separate"])
def test_correct_kernels_pass_the_check_silently(monkeypatch, shared):
    """Shared V / W_2 (dense variant) and separate experts (dispatch, checked with per-expert weights)."""
    calls = count_calls(monkeypatch)
    checked_with = []
    real_compare = selfcheck.compare
    monkeypatch.setattr(selfcheck, "compare", lambda *a, **kw: checked_with.append(kw) or real_compare(*a, **kw))
    moe, x = layer(shared=shared), torch.randn(3, 7, 16, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            y, _ = moe(x)
            moe(x)
    assert len(calls) == 3  # the check once, then both calls
    assert [kw["per_expert"] for kw in checked_with] == [shared == ()]  # the layer's own weight shapes
    torch.testing.assert_close(y, reference_of(moe, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cause,match", [
    (dict(wrong=1.5), r"disagree with the reference at first use \(y: max row error .* > 1e-03\)"),
    (dict(error=RuntimeError("PTXAS error: Internal Triton PTX codegen error")),
     r"failed at first use \(RuntimeError: PTXAS error: Internal Triton PTX codegen error\)"),
])
def test_a_failing_kernel_falls_back_with_one_warning(monkeypatch, cause, match):
    calls = count_calls(monkeypatch, **cause)
    moe, x = layer(), torch.randn(3, 7, 16, device=DEVICE)
    with pytest.warns(RuntimeWarning, match=match) as record:
        with torch.no_grad():
            y1, _ = moe(x)
            y2, _ = moe(x)
        assert not moe.uses_triton(x)  # with gradients too: no second check, no second warning
    assert len(record) == 1 and "falling back to backend='reference'" in str(record[0].message)
    assert len(calls) == 1
    torch.testing.assert_close(y1, reference_of(moe, x))
    assert torch.equal(y1, y2)


def test_a_lost_cuda_context_is_raised_not_a_fallback(monkeypatch):
    """After an illegal memory access every later CUDA call fails, the reference's too (as on an
    H200, 2026-12-04): the check raises, naming the way out, instead of warning and falling back."""
    error = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    count_calls(monkeypatch, error=error)
    moe, x = layer(), torch.randn(3, 7, 16, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"broke this process's CUDA context at first use \(AcceleratorError: "
                                           r"CUDA error: an illegal memory access.*MLIT_MOE_BACKEND=reference") as info:
        with torch.no_grad():
            moe(x)
    assert info.value.__cause__ is error


def test_the_check_runs_again_when_gradients_are_needed(monkeypatch):
    """An inference-only check does not vouch for the backward kernels."""
    calls = count_calls(monkeypatch)
    moe, x = layer(), torch.randn(2, 5, 16, device=DEVICE)
    with torch.no_grad():
        moe(x)
    moe(x)[0].sum().backward()
    assert len(calls) == 4  # check (no grad), call, check (grad), call
    assert moe.w1.grad is not None and moe.w1.grad.abs().sum() > 0


def test_a_bad_argument_is_raised_not_a_fallback():
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        layer()(torch.randn(2, 16, dtype=torch.float64, device=DEVICE))


def test_env_forces_the_reference(monkeypatch):
    calls = count_calls(monkeypatch, error=AssertionError("must not run"))
    monkeypatch.setenv("MLIT_MOE_BACKEND", "reference")
    moe, x = layer(), torch.randn(2, 5, 16, device=DEVICE)
    with torch.no_grad():
        torch.testing.assert_close(moe(x)[0], reference_of(moe, x))
    assert not calls


def test_env_forces_triton_without_check_or_fallback(monkeypatch):
    moe = layer()
    moe.backend = "reference"
    x = torch.randn(2, 5, 16, device=DEVICE)
    with torch.no_grad():
        expected = 1.5 * reference_of(moe, x)
        calls = count_calls(monkeypatch, wrong=1.5)
        monkeypatch.setenv("MLIT_MOE_BACKEND", "triton")
        torch.testing.assert_close(moe(x)[0], expected, rtol=1e-4, atol=1e-5)
    assert len(calls) == 1


def test_env_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv("MLIT_MOE_BACKEND", "cuda")
    with pytest.raises(ValueError, match=r"MLIT_MOE_BACKEND must be one of \('reference', 'triton'\) or unset"):
        layer()(torch.randn(2, 16, device=DEVICE))
    monkeypatch.setenv("MLIT_MOE_BACKEND", "triton")
    unshared = SharedSwiGLUMoE(16, 27, 5, shared=("w1", "w2"))
    with pytest.raises(ValueError, match="MLIT_MOE_BACKEND=triton, but the Triton kernels support only"):
        unshared(torch.randn(2, 16))
