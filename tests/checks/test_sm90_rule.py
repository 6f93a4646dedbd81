"""The sm_90 rule, pinned: no launched kernel (tuning candidates included) holds a wgmma dot with a
16- or 32-wide dimension beside other tensor-core dots — the pattern Triton 3.6–3.7 miscompile on
Hopper (illegal shared-memory reads, silent corruption) — unless a GPU run cleared the code of the
kernel's family on that Triton version (the built-in clearance table; bench/sm90_audit.py,
gpu_cleared).

What the models launch is recorded (mLiT-XXS / XS / S training and evaluation steps, mmLiT
pre-training, the MoE layer at t = 16 and 64; both MoE variants; every tuning candidate) and
compiled for sm_90 with the installed Triton up to the pass that picks each dot's MMA kind (wgmma,
mma.sync or FMA); no GPU needed. bench/sm90_audit.py compiles every launch to a cubin (registers, spills,
shared memory) with this Triton and the GPU machines' (3.6.0)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import sm90_audit  # noqa: E402

PTXAS = Path(__import__("triton").__file__).parent / "backends" / "nvidia"


def test_read_dots_tells_the_mma_kinds_apart():
    """The TTGIR reader on the three forms: wgmma, mma.sync (an nvidia_mma v2 layout), FMA."""
    ttgir = "\n".join([
        "#blocked4 = #ttg.blocked<{sizePerThread = [1, 4], threadsPerWarp = [4, 8]}>",
        "#mma = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [1, 8], instrShape = [16, 8]}>",
        "#mma3 = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 2], instrShape = [16, 16, 16]}>",
        "%a = ttng.warp_group_dot %x, %y, %z {inputPrecision = 0 : i32, isAsync = true} : tensor<128x32xf16, "
        "#ttg.dot_op<{opIdx = 0, parent = #mma3, kWidth = 2}>> * !ttg.memdesc<32x16xf16, #shared3, #smem> -> "
        "tensor<128x16xf32, #mma3> loc(#loc1)",
        "%b:2 = ttng.warp_group_dot_wait %a, %y {pendings = 0 : i32} : tensor<128x16xf32, #mma3>, "
        "!ttg.memdesc<32x16xf16, #shared3, #smem> loc(#loc1)",
        "%c = tt.dot %x, %y, %z, inputPrecision = tf32 : tensor<16x32xf16, #ttg.dot_op<{opIdx = 0, parent = #mma, "
        "kWidth = 2}>> * tensor<32x16xf16, #ttg.dot_op<{opIdx = 1, parent = #mma, kWidth = 2}>> -> "
        "tensor<16x16xf32, #mma> loc(#loc2)",
        "%d = tt.dot %x, %y, %z : tensor<128x32xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked4}>> * "
        "tensor<32x16xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked4}>> -> tensor<128x16xf32, #blocked4> loc(#loc3)",
    ])
    dots = sm90_audit.read_dots(ttgir)
    assert [(d["kind"], d["M"], d["N"], d["K"]) for d in dots] == [("wgmma", 128, 16, 32), ("mma", 16, 16, 32),
                                                                  ("fma", 128, 16, 32)]
    result = dict(dots=dots, triton="3.6.0")
    assert "wgmma 128x16x32 beside 1 other" in sm90_audit.breach(result, "k")
    assert sm90_audit.breach(dict(result, dots=dots[:1]), "k") is None  # one dot: no breach
    assert sm90_audit.breach(dict(result, dots=dots[1:]), "k") is None  # no wgmma
    assert [d["warps"] for d in dots] == [[4, 2], [1, 8], None]


def test_local_memory_in_loops():
    """Local stores and loads are told apart by whether a backward branch encloses them; widths
    from the opcode (STL 4 B, STL.64 8 B, LDL.128 16 B)."""
    sass = "\n".join([
        "        /*0000*/                   STL [R1], R2 ;",
        ".L_x_0:",
        "        /*0010*/                   STL.64 [R1+0x8], R4 ;",
        "        /*0020*/                   LDL.128 R8, [R1+0x10] ;",
        "        /*0030*/               @P0 BRA `(.L_x_0) ;",
        "        /*0040*/               @P1 BRA `(.L_x_1) ;",
        "        /*0050*/                   LDL R3, [R1] ;",
        ".L_x_1:",
        "        /*0060*/                   EXIT ;",
    ])
    assert sm90_audit.local_memory_in_loops(sass) == dict(local_stores=12, local_loads=20, local_stores_in_loops=8,
                                                          local_loads_in_loops=16)


def test_warps_on_thin_rows():
    """A 16-row mma.sync tile 128 wide with its 8 warps along the rows is flagged, along the
    columns not; nor is a tile too narrow to hold the warps along its columns."""
    def dot(m, n, warps):
        return dict(kind="mma", M=m, N=n, K=16, warps=warps)

    flagged = sm90_audit.warps_on_thin_rows(dict(dots=[dot(16, 128, [8, 1]), dot(16, 128, [1, 8]),
                                                       dot(32, 16, [8, 1]), dot(128, 128, [8, 1])]))
    assert flagged == ["16x128x16 at warps [8, 1]"]


def test_bf16_launches_are_recorded_as_a_gpu_launches_them():
    """Recorded under the interpreter, a bf16 launch has DOT_F32 set (its numpy has no bf16); the
    audit compiles what a GPU launches: bf16 products on tensor cores (DOT_F32 off)."""
    import torch

    from mlit_kernels.common.precision import dot_f32

    assert dot_f32(torch.bfloat16, interpreted=True) and not dot_f32(torch.bfloat16, interpreted=False)
    assert dot_f32(torch.float32, interpreted=False) and not dot_f32(torch.float16, interpreted=True)
    bf16 = [case for case in sm90_audit.LAYER_CASES if case[-1] == "bf16"]
    recorded = sm90_audit.record(quick=True, steps=(), layers=bf16, tokens=300)
    flags = {dict(r.signature.constexprs)["DOT_F32"] for r in recorded if "DOT_F32" in dict(r.signature.constexprs)}
    assert flags == {False}, flags
    assert {dict(r.signature.constexprs).get("DTYPE") for r in recorded} >= {"bf16"}


def test_signatures_follow_triton_specialisation():
    """The meter's LaunchSignature specialises arguments as the installed Triton's JIT does."""
    import torch
    import triton

    from mlit_kernels.meter import _argument_type

    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
    except ImportError:
        pytest.skip(f"triton {triton.__version__} has no native_specialize_impl")
    for value in (1, 0, 16, 17, 48, 2**31, -3, 1.5, True, torch.empty(4, dtype=torch.float16),
                  torch.empty(5)[1:], torch.empty(3, dtype=torch.uint8), torch.empty(8, dtype=torch.int64)[2:]):
        kind, attr = native_specialize_impl(BaseBackend, value, False, True, True)
        assert _argument_type(value) == (kind, attr == "D"), value


@pytest.mark.skipif(not (PTXAS / "bin" / "ptxas").exists(), reason="no ptxas bundled with this triton")
def test_no_launched_kernel_breaks_the_sm90_rule():
    """Every kernel with a dot, at every tuning candidate and tile shape the models launch
    (sm90_audit.rule_representatives: one launch per kernel, warps, stages and non-flag
    constexprs), compiled for sm_90 up to Triton's MMA choice: no breach; and in the kernels over
    width chunks (M0… / G0…) no mma.sync dot with its warps along rows the tile lacks
    (sm90_audit.warps_on_thin_rows). About 3 minutes on 2 cores with a cold cache
    (sm90_audit.CACHE: keyed by Triton version, kernel source and launch)."""
    start = time.perf_counter()
    recorded = sm90_audit.record(batch=8, tokens=300)
    kernels = {r.signature.name for r in recorded}
    chosen, reasons = sm90_audit.rule_representatives(recorded)
    assert kernels == {r.signature.name for r in chosen} | {reason.split(":")[0] for reason in reasons}
    jobs = [sm90_audit.job_of(r.signature, ttgir_only=True) for r in chosen]
    results = sm90_audit.compile_in(None, jobs, max(1, min(2, os.cpu_count() or 1)), sm90_audit.CACHE)
    failures = [f"{r.signature.name} ({sm90_audit.config_label(sm90_audit.dataclasses.asdict(r.signature))}, "
                f"warps {r.signature.num_warps}): {why}" for r, res in zip(chosen, results)
                if (why := sm90_audit.breach(res, r.signature.name))]
    assert not failures, "\n".join(failures)
    chunked = [f"{r.signature.name} ({sm90_audit.config_label(sm90_audit.dataclasses.asdict(r.signature))}, "
               f"warps {r.signature.num_warps}): {thin}" for r, res in zip(chosen, results)
               if {"M0", "G0"} & {name for name, _ in r.signature.constexprs}
               and (thin := sm90_audit.warps_on_thin_rows(res))]
    assert not chunked, "warps along rows the tile lacks (width chunks largest last?):\n" + "\n".join(chunked)
    tensor_core = {r.signature.name for r, res in zip(chosen, results) if any(d["kind"] != "fma" for d in res["dots"])}
    assert {"_fused_bwd_weights_kernel", "_weights_dx_kernel", "_proj_bwd_kernel", "_fused_fwd_kernel",
            "_experts_bwd_kernel"} <= tensor_core  # the reader saw the tensor-core dots
    print(f"{len(recorded)} launches of {len(kernels)} kernels, {len(chosen)} compiled in "
          f"{time.perf_counter() - start:.0f} s; not compiled: {'; '.join(reasons)}")


@pytest.mark.skipif(not (PTXAS / "bin" / "ptxas").exists(), reason="no ptxas bundled with this triton")
def test_the_fault_experiments_pattern_breaks_the_rule():
    """bench/gpu_faults.py's "pattern" experiment must hold the pattern it is to test on a GPU: at
    its launch (8 warps, x_chunkᵀ p of 128 × 16 over 32 rows beside pᵀ p) a wgmma 16 wide beside
    an mma.sync, as the dense weight kernel compiled before its products were transposed."""
    import torch

    import gpu_faults
    from mlit_kernels.meter import Meter

    with Meter(dry_run=True) as meter:
        gpu_faults._pattern_kernel[(17,)](torch.empty(5100, 128, dtype=torch.float16),
                                          torch.empty(5100, 16, dtype=torch.float16), torch.empty(17, 128, 16),
                                          torch.empty(17, 16, 16), 320, 5100, W=128, DC=16, ROWS=32, num_warps=8)
    (launch,) = meter.records
    (result,) = sm90_audit.compile_in(None, [sm90_audit.job_of(launch.signature, ttgir_only=True)], 1, None)
    assert sm90_audit.breach(result, "_pattern_kernel"), result
    assert [d["kind"] for d in result["dots"]] == ["wgmma", "mma"]


@pytest.mark.skipif(not (PTXAS / "bin" / "ptxas").exists(), reason="no ptxas bundled with this triton")
def test_gate_noise_keeps_no_local_memory():
    """The gate's Philox normal draws (mlit_kernels.common.gating.standard_normal, in every kernel
    that draws gate noise) compile for sm_90 without a local array or local memory: tl.randn's
    libdevice cosine declares a 28-byte array for its slow argument reduction, which ptxas kept
    in local memory in the larger kernels (16 B a launch inside the gate-routing kernel's loops)."""
    import torch

    from mlit_kernels.common import gating
    from mlit_kernels.meter import Meter

    with Meter(dry_run=True) as meter:
        gating.noise_kernel[(1,)](torch.empty(1000), torch.zeros(1, dtype=torch.int64), 1000, BLOCK=1024)
    (launch,) = [r for r in meter.records if r.kind == "triton"]
    (result,) = sm90_audit.compile_in(None, [sm90_audit.job_of(launch.signature)], 1, None)
    local = (result["ptx_local_arrays"], result["stack"], result["local_stores"], result["local_loads"])
    assert local == (0, 0, 0, 0), result


@pytest.mark.skipif(not (PTXAS / "bin" / "ptxas").exists(), reason="no ptxas bundled with this triton")
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_dispatch_weight_strip_fits_its_registers(dtype):
    """The dispatch weight kernel at mLiT-XXS's width (m = 108: one 128-wide column chunk,
    dispatch.launch.WEIGHT_SINGLE_CHUNK_MAX) compiles for sm_90 at its default launch without
    spills: as 16 + 32 + 64 columns it spilled 72 B (fp16, Triton 3.6) and 708 B in fp32 (FMA
    dots), 792 B of it inside loops (Triton 3.9)."""
    case = (f"108/27/5 {dtype}", 108, 27, 5, 2, 256 * 145, dtype)
    recorded = sm90_audit.record(quick=True, steps=(), layers=(case,), tokens=case[5])
    (launch,) = [r for r in recorded if r.signature.name == "_weights_dx_kernel" and r.default]
    assert dict(launch.signature.constexprs)["G0"] == 128
    (result,) = sm90_audit.compile_in(None, [sm90_audit.job_of(launch.signature)], 1, sm90_audit.CACHE)
    assert (result["spill_stores"], sm90_audit.in_loops(result)) == (0, 0), result
