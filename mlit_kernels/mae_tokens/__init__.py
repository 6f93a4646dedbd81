"""The mmLiT token shuffles: the encoder's input (the visible patches' tokens gathered, the dummy
last) and the decoder's input (the encoded visible tokens put back at their patches, the mask
token at the hidden ones, the dummy last, + the decoder's position table), one Triton launch each
forward (:mod:`.kernels`, :mod:`.ops`), or plain PyTorch (:mod:`.reference`). ``keep`` alone says
which patches are visible: the kernels need no property of it that only a host read could check.

Importing this package imports no Triton; the kernels are defined on the first call that runs them.
"""

from __future__ import annotations

from torch import Tensor

from ..common.clearance import uses_triton
from .family import FAMILY
from .reference import decoder_input_reference, encoder_input_reference


def encoder_input(tokens: Tensor, keep: Tensor, backend: str = "auto") -> Tensor:
    """v (B, K+1, D) from tokens (B, P+1, D) and keep (B, K) int64 the kept patches; the kernels where
    ``backend`` takes them (:func:`mlit_kernels.common.clearance.uses_triton`)."""
    if uses_triton(FAMILY, backend, tokens.device):
        from .ops import fused_encoder_input  # defines the kernels (Triton fixes interpret-or-compile then)

        return fused_encoder_input(tokens, keep)
    return encoder_input_reference(tokens, keep)


def decoder_input(latent: Tensor, keep: Tensor, token: Tensor, pos: Tensor | None, num_patches: int,
                  backend: str = "auto") -> Tensor:
    """x (B, P+1, D), P = ``num_patches``, from latent (B, K+1, D), keep (B, K), the mask token (D
    values) and pos ((1,) P+1, D) or None; the kernels where ``backend`` takes them."""
    if uses_triton(FAMILY, backend, latent.device):
        from .ops import fused_decoder_input

        return fused_decoder_input(latent, keep, token, pos, num_patches)
    return decoder_input_reference(latent, keep, token, pos, num_patches)


__all__ = ["FAMILY", "encoder_input", "decoder_input", "encoder_input_reference", "decoder_input_reference"]
