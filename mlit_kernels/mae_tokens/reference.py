"""The mmLiT token shuffles in plain PyTorch: the oracle of :mod:`mlit_kernels.mae_tokens`'s kernels
and what the "reference" backend runs.

    encoder:  v = [tokens[b, keep[b, j]] for j < K] + [the dummy tokens[b, P]]
    decoder:  the mask token at every patch, latent[b, j] scattered to patch keep[b, j] (the last
              slot naming a patch wins), the dummy latent[b, K] last; + pos
"""

from __future__ import annotations

import torch
from torch import Tensor


def encoder_input_reference(tokens: Tensor, keep: Tensor) -> Tensor:
    """v (B, K+1, D): the kept patches' tokens of tokens (B, P+1, D), then the dummy; keep (B, K) int64."""
    patches, dummy = tokens[:, :-1], tokens[:, -1:]
    gathered = torch.gather(patches, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
    return torch.cat([gathered, dummy], dim=1)


def decoder_input_reference(latent: Tensor, keep: Tensor, token: Tensor, pos: Tensor | None,
                            num_patches: int) -> Tensor:
    """x (B, P+1, D), P = ``num_patches``: latent (B, K+1, D)'s visible rows at their patches keep
    (B, K), the mask token (D values) at the others, the dummy last; + pos ((1,) P+1, D) when given."""
    b, _, d = latent.shape
    full = token.reshape(d).to(latent.dtype).expand(b, num_patches, d).clone()
    full.scatter_(1, keep.unsqueeze(-1).expand(-1, -1, d), latent[:, :-1])
    x = torch.cat([full, latent[:, -1:]], dim=1)
    return x if pos is None else x + pos


__all__ = ["encoder_input_reference", "decoder_input_reference"]
