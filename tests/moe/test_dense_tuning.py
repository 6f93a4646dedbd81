"""Every tuned configuration of the dense variant computes the same layer, and the tuner never
times kernels inside CUDA-graph capture.

What is promised (docs/layer.md, "Repeatability"): one configuration on one machine repeats bit for
bit; different configurations agree within the per-dtype tolerance, not bitwise — a different
token tile changes how a GPU's MMA instruction and reduction layouts group the sums, and under
Triton's interpreter ``tl.dot`` is ``np.matmul``, whose bits for a row depend on the tile's height.
Here every configuration is forced under the interpreter and compared with the first per row; the
tuner's capture rule is checked with capture and timing stubbed.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from mlit_kernels.common.tiling import interpreting
from mlit_kernels.reference import max_row_error as row_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("no CUDA and Triton kernels were imported without TRITON_INTERPRET=1", allow_module_level=True)

from mlit_kernels.common import tuning  # noqa: E402
from mlit_kernels.common.tuning import LaunchTuner  # noqa: E402
from mlit_kernels.dense import CONFIGS, force_config  # noqa: E402
from mlit_kernels.functional import moe_triton  # noqa: E402

TOL_FP16 = 1e-2  # the fp16 per-row tolerance of every kernel test (tests/moe/test_kernels.py)


def _forward_backward(n, m, d_h, t, k, dropout, norm=False):
    """y, aux and every gradient of one training step (fp16, Philox noise and dropout); with
    ``norm`` of x + MoE(LayerNorm(x)), norm and residual folded in (its weight and bias gradients
    last)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, m, generator=g).to(DEVICE, torch.float16).requires_grad_()
    shapes = [(m, t), (m, t), (t, m, d_h), (t, d_h), (m, d_h), (d_h,), (d_h, m), (m,)]
    params = [(torch.randn(*s, generator=g) * 0.3).to(DEVICE, torch.float32 if i < 2 else torch.float16)
              .requires_grad_() for i, s in enumerate(shapes)]
    ln = [(1 + 0.2 * torch.randn(m, generator=g)).to(DEVICE).requires_grad_(),
          (0.2 * torch.randn(m, generator=g)).to(DEVICE).requires_grad_()] if norm else []
    y, aux = moe_triton(x, *params, k, True, seed=11, dropout=dropout, variant="dense",
                        norm=(*ln, 1e-5) if norm else None, residual=norm)
    dy = torch.randn(n, m, generator=g).to(DEVICE, torch.float16)
    grads = torch.autograd.grad((y, aux), [x, *params, *ln], (dy, torch.ones((), device=DEVICE)))
    return [y, aux, *grads]


@pytest.mark.parametrize("norm", [False, True])
def test_every_configuration_computes_the_same_layer(norm):
    """Forcing each tuning candidate: outputs and every gradient (with a LayerNorm folded in too)
    within the fp16 tolerance of the first candidate's, row by row."""
    results = {}
    for config in CONFIGS:
        with force_config(config):
            # 260 tokens: two weight-gradient splits, a ragged last tile and partial-sum group
            results[config] = _forward_backward(260, 40, 16, 3, 2, dropout=0.1, norm=norm)
    first = results[CONFIGS[0]]
    for config, outs in results.items():
        errors = [row_error(b, a) for a, b in zip(first, outs)]
        assert max(errors) < TOL_FP16, f"{config} against {CONFIGS[0]}: {errors} (0 y, 1 aux, 2 dx, 3.. grads)"


def test_tuner_uses_the_default_inside_capture(monkeypatch, machine_cache):
    """In a process that may time (a clearance child): a key first met during CUDA-graph capture
    gets the default untimed, with one warning; the next eager call tunes it (every candidate timed
    once), and the choice is kept."""
    tuner = LaunchTuner("test", ("a", "b", "c"))
    timed = []
    capturing = [True]
    # machine_cache (conftest): no configuration kept on this machine
    monkeypatch.setattr(tuning, "interpreting", lambda: False)
    monkeypatch.setattr(tuning, "_TIMING", [True])
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    import triton.testing

    times = {"a": 3.0, "b": 1.0, "c": 2.0}
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: (fn(), times[timed[-1]])[1])
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match="inside CUDA-graph capture"):
        assert tuner.choose("key", cuda, timed.append) == "a"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning per key, not one per call
        assert tuner.choose("key", cuda, timed.append) == "a"
    assert timed == []
    capturing[0] = False
    assert tuner.choose("key", cuda, timed.append) == "b" and timed == ["a", "b", "c"]
    capturing[0] = True
    assert tuner.choose("key", cuda, timed.append) == "b" and timed == ["a", "b", "c"]  # kept, not retimed
    with tuner.force("c"):
        assert tuner.choose("key", cuda, timed.append) == "c"
    assert tuner.choose("key", torch.device("cpu"), timed.append) == "a"  # off CUDA: the default


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_capture_on_an_untuned_key_uses_the_default():
    """A shape first met inside CUDA-graph capture: nothing is timed there (one warning), the
    default configuration runs, and the replay equals an eager run at the default bit for bit."""
    from mlit_kernels import SharedSwiGLUMoE

    layer = SharedSwiGLUMoE(40, 24, 3, backend="triton").cuda().eval()
    x = torch.randn(300, 40, device="cuda")
    with torch.no_grad():
        with force_config(CONFIGS[0]):  # compiles the kernels; the key stays untuned
            expected, _ = layer(x)
        graph = torch.cuda.CUDAGraph()
        with pytest.warns(RuntimeWarning, match="inside CUDA-graph capture"), torch.cuda.graph(graph):
            y, _ = layer(x)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, expected)
