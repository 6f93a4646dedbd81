"""The modelled device of the meters and of launch decisions made by a cost model: a per-launch
roofline (:class:`DeviceModel`) and its H100 figures (:data:`H100`). Triton-free."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceModel:
    """A per-launch roofline: a launch takes max(launch cost, bytes / bandwidth, flops / peak).

    ``launch_captured``: the cost of a kernel boundary inside a CUDA graph; ``launch_uncaptured``:
    an eager launch (the host issuing one aten op or Triton kernel)."""

    name: str
    bandwidth: float  # HBM bytes / s
    peak_flops: float  # dense fp16 tensor-core FLOP / s
    launch_captured: float  # s
    launch_uncaptured: float  # s

    def launch_seconds(self, launch, captured: bool) -> float:
        """A launch (anything with ``bytes`` and ``flops``: a :class:`mlit_kernels.meter.Launch`)."""
        floor = self.launch_captured if captured else self.launch_uncaptured
        return max(floor, launch.bytes / self.bandwidth, launch.flops / self.peak_flops)

    def seconds(self, records: list, captured: bool) -> float:
        """The modelled time of ``records`` run back to back."""
        return sum(self.launch_seconds(r, captured) for r in records)


#: H100 SXM: 3.35 TB/s HBM3, 989 TFLOP/s dense fp16; 1.3 µs a kernel boundary in a CUDA graph
#: (the "No Bubbles" megakernel study), 4 µs an eager launch (3-5 µs measured for PyTorch ops).
H100 = DeviceModel("H100 SXM", 3.35e12, 989e12, 1.3e-6, 4e-6)


__all__ = ["DeviceModel", "H100"]
