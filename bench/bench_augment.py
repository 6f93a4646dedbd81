"""GPUAugment throughput (pytest-benchmark): CUDA batches 256/2048/8192 when present, else CPU batch 256
on one thread.

Run: python -m pytest bench/bench_augment.py --benchmark-only -q
On CUDA it times the Triton kernels (backend="triton", 4 launches a call) beside the torch path
(backend="reference", ~400 launches; also under torch.compile, whose first call, the compilation,
is a warm-up round). On the CPU only the torch path (Triton's interpreter is no timing).
extra_info["images_per_s"] is batch / fastest round (the H100 target is >= 200,000 images/s).
"""

import pytest
import torch

from mlit.data import GPUAugment

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


@pytest.fixture(autouse=True)
def _one_cpu_thread():
    """On CPU, one thread: several OpenMP threads on a shared 2-core machine only add noise."""
    threads = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VARIANTS = [("triton", False), ("reference", False), ("reference", True)] if CUDA else [("reference", False)]


@pytest.mark.parametrize("backend,compile", VARIANTS)
@pytest.mark.parametrize("batch", [256, 2048, 8192] if CUDA else [256])
@pytest.mark.parametrize("policy", ["cifar10", None])
def test_augment_throughput(benchmark, batch, policy, backend, compile):
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=DEVICE)
    aug = GPUAugment(train=True, crop_scale=(0.8, 1.0), hflip=0.5, autoaugment=policy, compile=compile,
                     backend=backend).prepare(DEVICE)

    def step():
        out = aug(x)
        if CUDA:
            torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(step, rounds=30 if CUDA else 5, iterations=1, warmup_rounds=2)
    assert out.shape == (batch, 3, 36, 36)
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if CUDA else "cpu"
    benchmark.extra_info["images_per_s"] = round(batch / benchmark.stats.stats.min)
