"""`mlit doctor`: on a CPU it runs every check through Triton's interpreter, prints one table, and
exits non-zero when a kernel disagrees with the reference. (Its CPU time is a benchmark row,
bench/bench_doctor.py, not a condition here.)"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import mlit  # noqa: E402
from mlit import cli, doctor  # noqa: E402
from mlit_kernels import selfcheck  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run; on a GPU `mlit doctor` checks the device")
def test_doctor_passes_on_the_cpu(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "device: cpu" in out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| check |") and len(table) == 2 + 8 + 4  # head, 2 shapes x 2 variants x 2, timings
    assert sum("| ok |" in line for line in table) == 8 and "all checks passed" in out
    assert sum("x reference |" in line for line in table) == 4


def test_a_mismatch_is_a_failed_row_and_exit_status_1(monkeypatch, capsys):
    def compare(m, d_h, t, k, n, **kwargs):
        return {"y": 0.0, "aux": 0.0, "w1": 0.5 if kwargs["variant"] == "dispatch" else 0.0}

    monkeypatch.setattr(selfcheck, "compare", compare)
    report = doctor.run(timing=False, quiet=True)
    failed = [row for row in report.rows if row[-1] == "MISMATCH"]
    assert not report.ok and failed and all(row[2] == "dispatch" and "5.0e-01 (w1)" in row[4] for row in failed)
    assert len(failed) == report.failures == len(report.rows) // 2
    assert "| MISMATCH |" in report.table()
    assert cli.main(["doctor", "--no-timing"]) == 1
    assert "failed check(s)" in capsys.readouterr().out


def test_a_kernel_error_is_a_row_naming_it(monkeypatch):
    def compare(*args, **kwargs):
        raise RuntimeError("PassManager::run failed\nmore")

    monkeypatch.setattr(selfcheck, "compare", compare)
    report = mlit.doctor.run(timing=False, quiet=True)  # importable from the package too
    assert report.failures == len(report.rows)
    assert all(row[-1] == "ERROR" and row[4] == "RuntimeError: PassManager::run failed" for row in report.rows)
