"""bench/peers.py in its smoke mode: every row of every case (this project's kernels, the torch
rows, and each peer that is installed or fetched) computes what it says against the float64
reference, the meters count it, and a peer that is absent is skipped with one line saying why.

Peers are optional (``python bench/peers.py --fetch``): the tests of a peer's rows skip, with the
reason, where the peer cannot be had. Under Triton's interpreter Liger-Kernel's LayerNorm and
SiLU-mul kernels cannot run (they call ``.to`` on a scalar argument, a tensor only when compiled):
their rows are still metered, and their checks are left to a GPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import peers  # noqa: E402

INTERPRETER_ONLY = {"Liger LayerNorm + F.linear", "Liger SiLUMul + 3 matmuls"}  # scalar .to() under the interpreter
PEERS = {"scattermoe": ("ScatterMoE",), "liger": ("Liger fused MoE", "Liger LayerNorm + F.linear",
                                                  "Liger cross-entropy", "Liger SiLUMul + 3 matmuls"),
         "vllm": ("vLLM fused_moe",)}


@pytest.fixture(scope="module")
def measured():
    """Every smoke case measured once (checks in fp32 through the interpreter; meters in fp16)."""
    cases = peers.moe_cases(peers.SMOKE_MOE_SHAPES, 40) + peers.step_cases(smoke=True, n_check=40)
    return peers.measure_all(cases, torch.float32, compile_cpu=False)


def _rows(measured, names):
    return [(case, r) for case, results in measured for r in results if r.row.name in names]


def test_mlit_and_torch_rows_match_the_reference_and_are_metered(measured):
    rows = [(case, r) for case, results in measured for r in results
            if r.row.ours or r.row.version.startswith("torch") and not r.row.compiled]
    assert len(rows) >= 18  # every smoke case has this project's rows and the eager torch ones
    for case, r in rows:
        assert r.skipped is None, (case.name, r.row.name, r.skipped)
        assert r.errors and max(r.errors.values()) <= peers.TOL[torch.float32], (case.name, case.mode, r.row.name,
                                                                                 r.errors)
        assert int(r.launches) > 0 and float(r.x_min) >= 1.0, (case.name, r.row.name, r.x_min)
        if r.row.ours:
            assert r.syncs == "0" and r.graph_us != "-", (case.name, r.row.name)


def test_mlit_moe_launch_counts(measured):
    """The fused layer's forward is 1 (dense) / 3 (dispatch) launches, training ≤ 10, as the layer meters pin."""
    for case, r in _rows(measured, ("mlit dense", "mlit dispatch")):
        if case.part == "moe":
            limit = (1 if r.row.name == "mlit dense" else 3) if case.mode == "fwd" else 10
            assert int(r.launches) <= limit, (case.name, case.mode, r.row.name, r.launches)


@pytest.mark.parametrize("peer", sorted(PEERS))
def test_peer_rows_match_the_reference_of_their_math(measured, peer):
    try:
        version = peers.load(peer).version
    except peers.Unavailable as why:
        pytest.skip(str(why))
    rows = _rows(measured, PEERS[peer])
    assert rows, f"no rows of {peer}"
    for case, r in rows:
        if r.skipped:
            assert r.row.name == "vLLM fused_moe" and case.mode == "train", (case.name, r.row.name, r.skipped)
            continue
        assert r.row.version == version
        assert int(r.launches) > 0, (case.name, r.row.name)
        if r.row.name in INTERPRETER_ONLY and r.check == "error":
            assert "has no attribute 'to'" in r.errors["error"], r.errors
            continue
        assert max(r.errors.values()) <= peers.TOL[torch.float32], (case.name, case.mode, r.row.name, r.errors)


def test_the_report_says_each_rows_version_and_math(measured):
    text = peers.report(measured, markdown=True)
    assert text.splitlines()[0].startswith("| case | mode | row | version | check | launches |")
    assert "mlit dense" in text and "| - | - |" in text  # no GPU: the time columns are blank, not invented
    for case, results in measured:
        for r in results:
            if r.skipped:
                assert f"- skipped: {r.row.name} (" in text and r.skipped in text


def test_an_absent_peer_is_skipped_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(peers, "PEERS_DIR", tmp_path)
    monkeypatch.setattr(peers, "_LOADED", {})
    for peer in ("scattermoe", "vllm"):
        with pytest.raises(peers.Unavailable) as why:
            peers.load(peer)
        assert "--fetch" in str(why.value) and "\n" not in str(why.value)
    case = peers.moe_cases(peers.SMOKE_MOE_SHAPES[:1], 40)[0]
    skipped = {row.name: row.skip for row in case.rows if row.skip}
    assert "ScatterMoE" in skipped and "vLLM fused_moe" in skipped
    case.rows = [row for row in case.rows if row.skip]
    result = {r.row.name: r for r in peers.measure(case, torch.float32, compile_cpu=False)}
    assert result["ScatterMoE"].skipped == skipped["ScatterMoE"] and result["ScatterMoE"].launches == "-"
