"""How long `mlit doctor` takes (pytest-benchmark): wall time per round, and its CPU time in
extra_info["cpu_seconds"] — the figure tests/app/test_doctor.py used to assert (a speed is a benchmark
row, never a pass/fail condition).

Run: python -m pytest bench/bench_doctor.py --benchmark-only -q
Without CUDA the doctor runs its small shapes through Triton's interpreter (fp32 and bf16, both
variants) and the timing smoke rows; on a GPU every check at the paper's shapes plus the timings.
"""

import time

import torch

from mlit import doctor


def test_doctor_time(benchmark):
    cpu = []

    def run():
        start = time.process_time()
        report = doctor.run(quiet=True)
        cpu.append(time.process_time() - start)
        return report

    report = benchmark.pedantic(run, rounds=1, iterations=1, warmup_rounds=0)
    assert report.ok, report.table()
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    benchmark.extra_info["cpu_seconds"] = round(min(cpu), 1)
    benchmark.extra_info["checks"] = len(report.rows)
