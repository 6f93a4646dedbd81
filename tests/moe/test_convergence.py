"""Convergence, in the manner of Liger-Kernel's: a small MoE model trained for some tens of steps on
fixed data with backend="reference" and with backend="triton" (Triton's interpreter on a CPU),
from the same weights with the same gate noise. A kernel that is right per call but wrong over
training (a gradient slightly off, a stale buffer, a state kept between steps) drifts apart here.

Tolerances (fp32): the loss of every step within rtol 1e-4 / atol 1e-6 (measured: 9e-7
relative at most), the final weights within atol 2e-5 + rtol 1e-3 (measured: 2.5e-6 at most; AdamW's
normalised steps carry the last-bit differences of early gradients along, step after step).
Interpreter cost: ~40 s of CPU for the Triton run (most of it per-launch overhead)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mlit_kernels import SharedSwiGLUMoE  # noqa: E402
from mlit_kernels.common.tiling import interpreting  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not interpreting():
    pytest.skip("no CUDA and Triton kernels were imported without TRITON_INTERPRET=1", allow_module_level=True)

STEPS, BATCH, TOKENS, WIDTH, CLASSES = 20, 8, 2, 16, 4
EXPERTS = (3, 12)  # one dense layer, one dispatch layer (variant "auto")


class Net(nn.Module):
    """Linear embedding → (LayerNorm → MoE, residual) per expert count → mean pool → linear head."""

    def __init__(self, backend: str):
        super().__init__()
        self.embed = nn.Linear(WIDTH, WIDTH)
        self.norms = nn.ModuleList(nn.LayerNorm(WIDTH) for _ in EXPERTS)
        self.moes = nn.ModuleList(SharedSwiGLUMoE(WIDTH, 20, t, k=2, dropout=0.0, backend=backend) for t in EXPERTS)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x, noises):
        h, aux = self.embed(x), 0.0
        for norm, moe, noise in zip(self.norms, self.moes, noises):
            y, layer_aux = moe(norm(h), noise=noise)
            h, aux = h + y, aux + layer_aux
        return self.head(h.mean(1)), aux


def train(backend: str):
    """Losses per step and final weights; data, init and gate noise drawn from fixed seeds."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, TOKENS, WIDTH, generator=g)
    labels = (x.mean(1) @ torch.randn(WIDTH, CLASSES, generator=g)).argmax(1)  # a learnable rule
    torch.manual_seed(0)
    model = Net(backend).to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(STEPS):
        noises = [torch.randn(BATCH * TOKENS, t, generator=g).to(DEVICE) for t in EXPERTS]
        logits, aux = model(x.to(DEVICE), noises)
        loss = F.cross_entropy(logits, labels.to(DEVICE)) + aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses), {n: p.detach().cpu() for n, p in model.named_parameters()}


def test_triton_training_converges_as_the_reference():
    losses_ref, weights_ref = train("reference")
    losses, weights = train("triton")
    assert losses_ref[-1] < 0.5 * losses_ref[0], losses_ref  # it does learn
    torch.testing.assert_close(losses, losses_ref, rtol=1e-4, atol=1e-6)
    for name, w in weights_ref.items():
        torch.testing.assert_close(weights[name], w, rtol=1e-3, atol=2e-5, msg=name)
