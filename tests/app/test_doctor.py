"""`mlit doctor`: on a CPU it checks every kernel family of the registry in child processes through
Triton's interpreter, prints one table (and one of timings), records the verdicts in the machine
cache, and exits non-zero when a family fails. (Its CPU time is a benchmark row,
bench/bench_doctor.py, not a condition here.)"""

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mlit  # noqa: E402
from mlit import cli, doctor  # noqa: E402
from mlit.config import ENCODERS  # noqa: E402
from mlit_kernels import checks, registry  # noqa: E402
from mlit_kernels.common import clearance  # noqa: E402


pytestmark = pytest.mark.usefixtures("machine_cache")  # a fresh machine cache for each test (conftest)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run; on a GPU `mlit doctor` checks the device")
def test_doctor_checks_every_family_on_the_cpu(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "device: cpu" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    families = [line.split("|")[1].strip() for line in table if line.split("|")[4].strip() == "cleared"]
    assert sorted(families) == sorted(registry.NAMES) and "all checks passed" in out
    assert sum("x |" in line for line in table) == 4  # layer and step, reference and Triton
    assert all(clearance.cleared(registry.family(name), "cpu") for name in registry.NAMES)
    assert cli.main(["doctor", "--clear", "--json"]) == 0  # every family cleared already: nothing to check
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]


def _fake_clear(failing: str, cause: str):
    """A clear() that 'checks' without children: ``failing`` fails with ``cause``."""
    def clear(families, shapes, device, *, report=None, **kwargs):
        verdicts = []
        for family in families:
            bad = family.name == failing
            verdict = clearance.Verdict(family=family.name, source_hash="0" * 16, triton="x", capability="interpreter",
                                        cleared=not bad, cause=cause if bad else None,
                                        detail="dx 5.00e-01 > 1e-04" if bad else "", errors={"dx": [0.5 if bad else 0.0,
                                                                                                       1e-4]},
                                        checked=[{"shape": {}, "dtypes": ["fp32"]}])
            report(verdict)
            verdicts.append(verdict)
        return verdicts
    return clear


def test_a_failed_family_is_a_row_and_exit_status_1(monkeypatch, capsys):
    monkeypatch.setattr(checks, "clear", _fake_clear("dispatch", "disagreement"))
    report = doctor.run(timing=False, quiet=True)
    failed = [row for row in report.rows if row[3].startswith("FAILED")]
    assert not report.ok and report.failures == 1 and failed[0][0] == "dispatch"
    assert failed[0][3] == "FAILED: disagreement" and "5.0e-01" in failed[0][4]
    assert "| FAILED: disagreement |" in report.table()
    assert cli.main(["doctor", "--no-timing"]) == 1
    assert "1 failed check(s)" in capsys.readouterr().out


def test_json_prints_one_record_per_family(monkeypatch, capsys):
    monkeypatch.setattr(checks, "clear", _fake_clear("attention", "fault"))
    assert mlit.doctor.run(as_json=True, families=("attention", "loss")).failures == 1  # importable from the package
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["family"] for r in records] == ["attention", "loss"]
    assert records[0]["verdict"] == "failed" and records[0]["cause"] == "fault"
    assert records[1]["verdict"] == "cleared" and records[1]["worst"]["limit"] == 1e-4


def test_model_shapes_cover_the_run():
    """The shapes a run's families are checked at: every MoE layer's (m, d_h, t), the attention of
    encoder and decoder, the heads; the MoE token count capped with its residue mod 16 kept."""
    xxs = ENCODERS["XXS"]
    train = doctor.model_shapes(xxs, 256, "train", num_classes=100)
    assert set(train) == set(doctor.TASK_FAMILIES["train"])
    assert {s["d_h"] for s in train["dense"]} == {xxs.hidden_dim(i) for i in range(xxs.depth)}
    assert all(s["N"] == 4096 + (256 * 145) % 16 and s["norm"] for s in train["dense"])
    assert train["loss"] == [dict(B=256, C=100)] and train["norm_linear"][0]["E"] == 100
    pretrain = doctor.model_shapes(xxs, 4, "pretrain")
    assert {s["n"] for s in pretrain["attention"]} == {37, 145} and "loss" not in pretrain
    assert {s["N"] for s in pretrain["dense"]} == {4 * 37, 4 * 145}
