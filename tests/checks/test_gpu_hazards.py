"""What only a GPU shows (issue 19), checked on one; bench/gpu_run.py runs this module first.

Triton's interpreter runs one program at a time with exact math, so the CPU suite cannot see:
a race between a GPU's threads (a kernel reading a buffer it stores), results that depend on the
configuration autotuning picks by timing, tuning inside CUDA-graph capture (CUDA forbids the
timing), and approximate ``exp``. On a CUDA device this module checks:

* the dispatch path's gate (inside ``mlit_kernels.ops.dispatch_moe``) at N = 4096 + 37 tokens, t = 32 and
  64, k = 2, 200 repetitions: every repetition bitwise the first, gates equal to a torch softmax
  of the logits at the chosen indices, which are a top k, rows summing to 1;
* for each forced configuration (every ``LaunchTuner`` / ``triton.autotune`` of the package, the
  i-th candidate of each at once), the layer's forward and backward run twice bitwise equal;
  two fresh processes running the same configuration give bitwise equal gradients; every
  configuration agrees with the first within the fp16 tolerance, and how many of its tensors are
  bitwise equal to the first's is reported (measured, not promised: docs/layer.md);
* a CUDA graph captured on a tuning key never met (no warm-up at that key) runs and replays the
  eager result;
* 10,000 images through the augmentation kernels against the torch path: crop-box differences
  (read off coordinate-ramp images) must be 0, pixel differences rare.

Written against public entry points (``SharedSwiGLUMoE``, ``mlit_kernels.ops``,
``mlit.data.GPUAugment``); the configuration mechanisms are found by walking ``mlit_kernels``.
Without CUDA the GPU tests skip; the helpers run at tiny shapes under the interpreter
(``test_helpers_*``). Figures are printed (gpu_run runs this file with ``-rA``).
Run as a script, the module is the fresh process of the two-process and capture checks.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import pkgutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU: thread races, tuning by timing, CUDA-graph capture "
                                                 "and approximate exp do not exist under Triton's CPU interpreter")
interpreted = pytest.mark.skipif(CUDA or os.environ.get("TRITON_INTERPRET") != "1",
                                 reason="the CPU run of the helpers needs Triton's interpreter")


def _figures(name: str, **values) -> None:
    print(f"FIGURES {name}: " + ", ".join(f"{k}={v}" for k, v in values.items()), flush=True)


# ----------------------------------------------------------------------------------------------
# the gate: no race, repeatable, a softmax of the chosen logits


def gate_check(device, n: int, m: int, t: int, k: int, reps: int, training: bool) -> dict:
    """Run the dispatch gate ``reps`` times on one input; return the counts and errors the test
    bounds (training: with a given noise tensor, so the reference can add it)."""
    from mlit_kernels import ops

    g = torch.Generator().manual_seed(t * 1000 + k)
    x = torch.randn(n, m, generator=g).to(torch.float16).to(device)
    w_gate = (torch.randn(m, t, generator=g) / m ** 0.5).to(device)
    w_noise = (torch.randn(m, t, generator=g) / m ** 0.5).to(device)
    noise = torch.randn(n, t, generator=g).to(device) if training else None
    seed = torch.zeros(1, dtype=torch.int64, device=device)
    eps = 1e-2
    d_h = 16  # the experts only have to exist: the gate's outputs are what is checked
    experts = [(torch.randn(*shape, generator=g) / m ** 0.5).to(torch.float16).to(device)
               for shape in ((t, m, d_h), (t, d_h), (m, d_h), (d_h,), (d_h, m), (m,))]
    first, repeats_differing = None, 0
    for _ in range(reps):
        outputs = ops.dispatch_moe(x, w_gate, w_noise, *experts, seed, noise, k, training, training, 0.0, eps,
                                   1e-2, 1e-2, True, True, torch.float16)
        idx, gate = outputs[2], outputs[3]
        if first is None:
            first = (gate.clone(), idx.clone())
        else:
            repeats_differing += int(not (torch.equal(gate, first[0]) and torch.equal(idx, first[1])))
    gate, idx = first
    xf = x.double()
    h = xf @ w_gate.double()
    if training:
        h = h + noise.double() * (torch.nn.functional.softplus(xf @ w_noise.double()) + eps)
    chosen = h.gather(1, idx.long())
    others = h.scatter(1, idx.long(), float("-inf"))
    return dict(
        repeats_differing=repeats_differing,
        gate_error=(gate.double() - torch.softmax(chosen, dim=1)).abs().max().item(),
        row_sum_error=(gate.double().sum(1) - 1).abs().max().item(),
        indices_in_range=bool(((idx >= 0) & (idx < t)).all()),
        distinct=bool((idx.sort(1).values.diff(dim=1) != 0).all()) if k > 1 else True,
        topk_violation=max(0.0, (others.max(1).values - chosen.min(1).values).max().item()),
        ordered=bool((chosen.diff(dim=1) <= 1e-5).all()),  # largest first, up to near ties
    )


def assert_gate(result: dict) -> None:
    assert result["repeats_differing"] == 0, result
    assert result["indices_in_range"] and result["distinct"] and result["ordered"], result
    assert result["topk_violation"] <= 1e-5, result  # only near ties may pick either (fp32 logits)
    assert result["gate_error"] <= 1e-5 and result["row_sum_error"] <= 1e-6, result


@needs_cuda
@pytest.mark.parametrize("training", [False, True], ids=["eval", "noisy"])
@pytest.mark.parametrize("t", [32, 64])
def test_gate_has_no_race(t, training):
    result = gate_check("cuda", 4096 + 37, 144, t, 2, 200, training)
    _figures(f"gate t={t} {'noisy' if training else 'eval'}", **result)
    assert_gate(result)


@interpreted
def test_helpers_gate_under_the_interpreter():
    for training in (False, True):
        assert_gate(gate_check("cpu", 37, 27, 5, 2, 2, training))


# ----------------------------------------------------------------------------------------------
# forced configurations: each repeatable; two fresh processes agree


def tuning_mechanisms() -> tuple[list, list]:
    """Every way the package picks a kernel configuration, found by walking ``mlit_kernels``:
    its :class:`~mlit_kernels.common.tuning.LaunchTuner` objects and any ``triton.autotune`` wrappers."""
    import mlit_kernels
    from mlit_kernels.common.tuning import LaunchTuner
    from triton.runtime.autotuner import Autotuner

    launch_tuners, autotuners = {}, {}
    for info in pkgutil.walk_packages(mlit_kernels.__path__, "mlit_kernels."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if isinstance(obj, LaunchTuner):
                launch_tuners[id(obj)] = obj
            elif isinstance(obj, Autotuner):
                autotuners[id(obj)] = obj
    return list(launch_tuners.values()), list(autotuners.values())


def configuration_count() -> int:
    launch_tuners, autotuners = tuning_mechanisms()
    return max([len(t.candidates) for t in launch_tuners] + [len(t.configs) for t in autotuners] + [1])


@contextlib.contextmanager
def forced(i: int):
    """Every configuration mechanism set to its i-th candidate (modulo its count); no tuning."""
    launch_tuners, tuners = tuning_mechanisms()
    saved = [list(t.configs) for t in tuners]
    with contextlib.ExitStack() as stack:
        for tuner in launch_tuners:
            stack.enter_context(tuner.force(tuner.candidates[i % len(tuner.candidates)]))
        for tuner, configs in zip(tuners, saved):
            tuner.configs = [configs[i % len(configs)]]
        try:
            yield
        finally:
            for tuner, configs in zip(tuners, saved):
                tuner.configs = configs


@dataclass(frozen=True)
class Shape:
    n: int
    m: int
    d_h: int
    t: int
    k: int
    variant: str
    dtype: str = "float16"


GPU_SHAPES = (Shape(4096 + 37, 144, 144, 5, 2, "dense"), Shape(4096 + 37, 108, 81, 32, 2, "dispatch"))
TINY_SHAPES = (Shape(21, 16, 16, 3, 2, "dense"), Shape(19, 16, 16, 12, 2, "dispatch"))  # fp16, as on the GPU


def make_layer(shape: Shape, device):
    """SharedSwiGLUMoE with random fp32 weights (fixed), on the Triton backend, and an input x in
    the shape's dtype (the compute dtype of the expert products)."""
    from mlit_kernels import SharedSwiGLUMoE

    layer = SharedSwiGLUMoE(shape.m, shape.d_h, shape.t, k=shape.k, backend="triton", triton_variant=shape.variant)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / max(p.shape[-2] if p.ndim > 1 else shape.m, 1) ** 0.5)
    x = torch.randn(shape.n, shape.m, generator=g).to(device=device, dtype=getattr(torch, shape.dtype))
    layer = layer.to(device)
    return layer, x


def layer_step(layer, x, seed: int = 3) -> list[torch.Tensor]:
    """y, aux, dx and every weight gradient of one training forward + backward (noise and
    dropout drawn from a fixed seed tensor)."""
    layer.train()
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # a path that draws with torch's RNG (the dispatch path's dropout)
    x = x.detach().requires_grad_(True)
    y, aux = layer(x, seed=torch.tensor([seed], dtype=torch.int64, device=x.device))
    dy = torch.linspace(-1, 1, y.numel(), device=y.device).view_as(y)
    ((y.float() * dy).sum() + aux).backward()
    return [y.detach(), aux.detach(), x.grad] + [p.grad for p in layer.parameters()]


def differing(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[int]:
    """Positions of the tensors that are not bitwise equal (NaN equal to NaN)."""
    return [i for i, (u, v) in enumerate(zip(a, b)) if not torch.equal(u.nan_to_num(), v.nan_to_num())]


def forced_repeatability(shape: Shape, device, configurations=None) -> dict[int, list[int]]:
    """For each forced configuration i (all by default): the outputs / gradients differing
    between two runs."""
    layer, x = make_layer(shape, device)
    result = {}
    for i in configurations or range(configuration_count()):
        with forced(i):
            result[i] = differing(layer_step(layer, x), layer_step(layer, x))
    return result


def fresh_process_step(shape: Shape, device, out: Path, configuration: int = 0) -> None:
    """Run ``layer_step`` at the forced ``configuration`` in a new Python process and save its
    tensors to ``out``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, __file__, "step", "--shape", json.dumps(vars(shape)), "--device", str(device),
                    "--configuration", str(configuration), "--out", str(out)], check=True, cwd=REPO, env=env,
                   timeout=900)


def cross_configuration(shape: Shape, device, configurations=None) -> dict[int, dict]:
    """For each forced configuration i > 0 (all by default): the positions of its tensors not
    bitwise equal to configuration 0's, and its worst per-row error against them."""
    from mlit_kernels.reference import max_row_error

    layer, x = make_layer(shape, device)
    with forced(0):
        first = layer_step(layer, x)
    result = {}
    for i in configurations or range(1, configuration_count()):
        with forced(i):
            outs = layer_step(layer, x)
        result[i] = dict(differing=differing(first, outs),
                         max_row_error=max(max_row_error(b, a) for a, b in zip(first, outs) if a is not None))
    return result


@needs_cuda
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: s.variant)
def test_forced_configurations_repeat_bitwise(shape):
    result = forced_repeatability(shape, "cuda")
    _figures(f"forced configurations {shape.variant}", configurations=len(result),
             differing={i: d for i, d in result.items() if d})
    assert not any(result.values()), result


@needs_cuda
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: s.variant)
def test_two_fresh_processes_agree(shape, tmp_path):
    """One configuration, two processes: bit for bit."""
    for name in ("a", "b"):
        fresh_process_step(shape, "cuda", tmp_path / f"{name}.pt")
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    _figures(f"fresh processes {shape.variant}", differing=differing(a, b))
    assert not differing(a, b)


@needs_cuda
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: s.variant)
def test_configurations_agree_within_tolerance(shape):
    """Every configuration against the first: within the fp16 tolerance; the bitwise differences
    are printed (docs/layer.md reports them), not asserted."""
    result = cross_configuration(shape, "cuda")
    _figures(f"cross-configuration bits {shape.variant}", **{f"config{i}": r for i, r in result.items()})
    assert all(r["max_row_error"] < 1e-2 for r in result.values()), result


@interpreted
def test_helpers_configurations_under_the_interpreter(tmp_path):
    from mlit_kernels.dense import TUNER

    launch_tuners, _ = tuning_mechanisms()
    assert TUNER in launch_tuners  # the walk finds the dense variant's tuner
    dense, dispatch = TINY_SHAPES  # a few configurations (all of them take ~45 s here): the
    assert not any(forced_repeatability(dense, "cpu", [0, configuration_count() - 1]).values())
    assert not any(forced_repeatability(dispatch, "cpu", [0]).values())  # interpreter: one autotune config
    fresh_process_step(dense, "cpu", tmp_path / "fresh.pt")  # one fresh process (~12 s), against this one
    fresh = torch.load(tmp_path / "fresh.pt")
    with forced(0):
        assert len(fresh) == 3 + 8 and not differing(fresh, layer_step(*make_layer(dense, "cpu")))
    last = cross_configuration(dense, "cpu", [configuration_count() - 1])
    assert last[configuration_count() - 1]["max_row_error"] < 1e-2, last


# ----------------------------------------------------------------------------------------------
# capture on a tuning key never met


CAPTURE_SHAPES = (Shape(1000 + 7, 108, 27, 5, 2, "dense"), Shape(1000 + 7, 108, 27, 12, 2, "dispatch"))


def capture_untuned(shape: Shape) -> dict:
    """In a fresh process: compile every candidate configuration at ``shape`` under ``forced``
    (which never tunes), then capture the evaluation forward and a training forward + backward
    with nothing forced, so that the tuning key is first met inside the capture; replay both.
    Returns what happened (errors as text) and the warnings raised."""
    layer, x = make_layer(shape, "cuda")
    for i in range(configuration_count()):
        with forced(i):
            layer_step(layer, x)
            layer.eval()
            with torch.no_grad():
                layer(x)
    result = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for mode in ("eval", "train"):
            try:
                graph = torch.cuda.CUDAGraph()
                if mode == "eval":
                    layer.eval()
                    with torch.no_grad(), torch.cuda.graph(graph):
                        y, _ = layer(x)
                    graph.replay()
                    torch.cuda.synchronize()
                    with torch.no_grad():
                        eager, _ = layer(x)
                    result["eval_max_error"] = (y.float() - eager.float()).abs().max().item()
                    result["eval_bitwise"] = torch.equal(y, eager)
                else:
                    layer.train()
                    static_x = x.detach().clone().requires_grad_(True)
                    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
                    with torch.cuda.graph(graph):
                        y, aux = layer(static_x, seed=seed)
                        (y.float().sum() + aux).backward()
                    graph.replay()
                    torch.cuda.synchronize()
                    result["train_finite"] = bool(torch.isfinite(static_x.grad).all())
                result[mode] = "ok"
            except Exception as err:  # noqa: BLE001 - the report names what failed
                result[mode] = f"{type(err).__name__}: {err}"[:500]
                torch.cuda.synchronize()
    result["warnings"] = sorted({str(w.message)[:200] for w in caught})
    return result


@needs_cuda
@pytest.mark.parametrize("shape", CAPTURE_SHAPES, ids=lambda s: s.variant)
def test_capture_on_an_untuned_key(shape):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, "capture", "--shape", json.dumps(vars(shape))], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    _figures(f"capture {shape.variant}", **result)
    assert result["eval"] == "ok" and result["train"] == "ok", result
    assert result["eval_max_error"] <= 1e-2 and result["train_finite"], result


# ----------------------------------------------------------------------------------------------
# augmentation: the kernels against the torch path


def ramp_images(b: int, size: int = 32) -> torch.Tensor:
    """uint8 (b, 3, size, size): channel 0 = 8·column, channel 1 = 8·row, channel 2 = 128. A
    bilinear sample of a ramp is the ramp at the sampled point, so a crop box moved by one pixel
    changes some output pixel by about 7 levels, a rounding tie by 1."""
    ramp = torch.arange(size) * 8
    image = torch.stack([ramp.expand(size, size), ramp[:, None].expand(size, size), torch.full((size, size), 128)])
    return image.to(torch.uint8).expand(b, 3, size, size).contiguous()


def augmentation_differences(device, n_images: int, batch: int, policy: str | None, images=None) -> dict:
    """Run ``n_images`` through GPUAugment's Triton kernels and its torch path with the same
    draws; count images whose crop box differs (ramp images: a difference of 2 levels or more in
    the ramp channels), images with any differing pixel and the fraction of differing pixels."""
    from mlit.data import GPUAugment

    box, images_differing, pixels, total = 0, 0, 0, 0
    for start in range(0, n_images, batch):
        b = min(batch, n_images - start)
        x = (ramp_images(b) if images is None else images[start:start + b]).to(device)
        outs = []
        for backend in ("triton", "reference"):
            g = torch.Generator(device=device).manual_seed(start)
            outs.append(GPUAugment(autoaugment=policy, backend=backend)(x, generator=g))
        diff = ((outs[0] - outs[1]).abs() * 127.5).round()
        if images is None:
            box += int((diff[:, :2].flatten(1).amax(1) >= 2).sum())
        images_differing += int((diff.flatten(1).amax(1) > 0).sum())
        pixels += int((diff > 0).sum())
        total += diff.numel()
    return dict(images=n_images, crop_box_differences=box, images_differing=images_differing,
                pixel_fraction=pixels / max(total, 1))


def natural_images(b: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    smooth = torch.nn.functional.interpolate(torch.rand(b, 3, 5, 5, generator=g) * 255, size=size, mode="bilinear")
    return (smooth + 12 * torch.randn(b, 3, size, size, generator=g)).clamp(0, 255).round().to(torch.uint8)


@needs_cuda
def test_augmentation_kernels_are_the_torch_path():
    crop = augmentation_differences("cuda", 10_000, 1000, None)
    _figures("augmentation crop boxes (ramp images)", **crop)
    full = augmentation_differences("cuda", 10_000, 1000, "cifar10", images=natural_images(10_000))
    _figures("augmentation with AutoAugment cifar10 (natural images)", **full)
    assert_augmentation(crop, full)


def assert_augmentation(crop: dict, full: dict) -> None:
    """No crop box moved; pixel differences (rounding of a bilinear sample that lands on a .5:
    an fma rounded once or twice) in fewer than 0.2% of the values."""
    assert crop["crop_box_differences"] == 0, crop
    assert crop["pixel_fraction"] < 2e-3 and full["pixel_fraction"] < 2e-3, (crop, full)


@interpreted
def test_helpers_augmentation_under_the_interpreter():
    crop = augmentation_differences("cpu", 12, 6, None)
    full = augmentation_differences("cpu", 8, 8, "cifar10", images=natural_images(8))
    assert crop["images"] == 12 and full["images"] == 8
    assert_augmentation(crop, full)


def test_ramp_images_reveal_a_moved_crop_box():
    """The box count's premise: shifting the crop by one source pixel moves a ramp output by >= 2
    levels somewhere, while the same crop twice differs nowhere (torch path, CPU)."""
    import torch.nn.functional as F

    x = ramp_images(1).float()
    grids = []
    for left in (3, 4):
        theta = torch.tensor([[[28 / 32, 0.0, (2 * left + 28) / 32 - 1], [0.0, 1.0, 0.0]]])
        grids.append(F.affine_grid(theta, (1, 3, 36, 36), align_corners=False))
    a, b = (F.grid_sample(x, g, mode="bilinear", padding_mode="border", align_corners=False).round() for g in grids)
    assert (a - b)[:, :2].abs().amax() >= 2 and torch.equal(a, a.clone())


def test_gpu_run_runs_this_module_first(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_run
    finally:
        sys.path.pop(0)
    ctx = gpu_run.Context(out=tmp_path, smoke=False, cuda=True, data_dir=tmp_path, cache_dir=tmp_path,
                          train_dir=tmp_path, train_backend="auto")
    first = gpu_run.build_steps(ctx)["tests"].commands[0].argv
    assert "tests/checks/test_gpu_hazards.py" in first and "-rA" in first


# ----------------------------------------------------------------------------------------------
# the fresh processes


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="a fresh process of tests/checks/test_gpu_hazards.py")
    parser.add_argument("what", choices=("step", "capture"))
    parser.add_argument("--shape", required=True, help="a Shape as JSON")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--configuration", type=int, default=0, help="the forced configuration of 'step'")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    shape = Shape(**json.loads(args.shape))
    if args.what == "step":
        with forced(args.configuration):
            torch.save([t.cpu() for t in layer_step(*make_layer(shape, args.device))], args.out)
    else:
        print(json.dumps(capture_untuned(shape)))


if __name__ == "__main__":
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")  # as tests/conftest.py, before triton is imported
    main()
