"""The Philox seed a kernel loads from the device (no host read, so CUDA graphs capture it)."""

from __future__ import annotations

import torch


def philox_seed(seed, needed: bool, device) -> torch.Tensor:
    """The (1,) int64 Philox seed on the device: ``seed`` (an int or a tensor) when given, else drawn
    with torch.randint when ``needed`` (graph-safe and reproducible with torch.manual_seed, like
    dropout's RNG); left unset when nothing is drawn."""
    if isinstance(seed, torch.Tensor):
        return seed.to(device=device, dtype=torch.int64).reshape(1)
    if seed is not None:
        return torch.tensor([int(seed)], dtype=torch.int64, device=device)
    if needed:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)
    return torch.empty(1, dtype=torch.int64, device=device)


__all__ = ["philox_seed"]
