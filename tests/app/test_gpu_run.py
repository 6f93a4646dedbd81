"""bench/gpu_run.py, the GPU session's one command, run on the CPU: the smoke run of the training-step
and training steps keeps its results folder (versions, logs, summary, tables, the archive for the
device tool), a failing or timed-out step does not stop the next, and the train step resumes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_run.py"
FASHION = Path("/usr/share/datasets/fashion-mnist")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_run = _module()


def _ctx(tmp_path, **kw):
    values = dict(out=tmp_path / "out", smoke=True, cuda=False, data_dir=tmp_path / "fm", cache_dir=tmp_path / "cache",
                  train_dir=tmp_path / "out" / "train", train_backend="auto")
    values.update(kw)
    values["out"].mkdir(parents=True, exist_ok=True)
    return gpu_run.Context(**values)


@pytest.mark.slow
@pytest.mark.skipif(not FASHION.is_dir(), reason="Fashion-MNIST absent: apt-get install dataset-fashion-mnist")
def test_smoke_run_keeps_every_result(tmp_path):
    """--prepare-data, then --smoke --steps step,train: ~40 s on 2 CPU cores."""
    data, out, exported = tmp_path / "fm", tmp_path / "r1", tmp_path / "exported"
    prep = subprocess.run([sys.executable, str(SCRIPT), "--prepare-data", "--data-dir", str(data)],
                          capture_output=True, text=True, timeout=120)
    assert prep.returncode == 0, prep.stderr
    assert sorted(p.name for p in data.iterdir()) == sorted(gpu_run.FASHION_FILES)

    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--steps", "step,train", "--out", str(out),
                          "--export", str(exported), "--data-dir", str(data), "--cache-dir", str(tmp_path / "cache"),
                          "--budget", "600"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    versions = json.loads((out / "versions.json").read_text())
    for key in ("python", "torch", "triton", "device", "date", "commit"):
        assert versions.get(key), key
    assert versions["cuda_available"] is torch.cuda.is_available()
    records = json.loads((out / "steps.json").read_text())
    assert [records[s]["status"] for s in ("step", "train")] == ["ok", "ok"]
    assert "images/s" in (out / "step.log").read_text()
    rows = (out / "train.csv").read_text().splitlines()
    assert rows[0].startswith("date,device,task,mode,model,batch,images_per_s") and len(rows) == 3  # train, pretrain
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 1 and 0 <= metrics[0]["test_top1"] <= 100
    assert (out / "train" / "accuracy.png").is_file() and (out / "train" / "loss.png").is_file()

    summary = (out / "summary.md").read_text()
    assert "| step | ok |" in summary and "| train | ok |" in summary and "all 1 epochs done" in summary
    assert f"final test top-1: {round(metrics[0]['test_top1'], 2)}" in summary
    assert "## Training step, images/s (train.csv)" in summary and "eager-reference" in summary
    assert versions["torch"] in summary

    assert (exported / "r1-summary.md").read_text() == summary
    with tarfile.open(exported / "r1.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"r1/summary.md", "r1/versions.json", "r1/step.log", "r1/train.log", "r1/train.csv",
            "r1/train/metrics.jsonl", "r1/train/accuracy.png"} <= names


def test_clear_step_records_the_verdicts_in_the_runs_cache(tmp_path):
    """--smoke --steps clear: `mlit doctor --clear --json` on two families in child processes; the
    verdicts land in the run's own machine cache (which the later steps use) and, on a GPU, the
    cleared ones in cleared.py for the built-in table (none from the interpreter)."""
    out = tmp_path / "r0"
    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--steps", "clear", "--out", str(out),
                          "--budget", "300"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    record = json.loads((out / "steps.json").read_text())["clear"]
    assert record["status"] == "ok" and record["cleared"] == ([] if not torch.cuda.is_available() else record["cleared"])
    lines = [json.loads(line) for line in (out / "clearance.jsonl").read_text().splitlines() if line.startswith("{")]
    assert sorted(r["family"] for r in lines) == ["loss", "mae_loss"] and all(r["verdict"] == "cleared" for r in lines)
    cache = json.loads((out / "cache" / "clearance.json").read_text())
    assert sorted(v["family"] for v in cache["verdicts"]) == ["loss", "mae_loss"]
    assert (out / "cleared.py").read_text().startswith("# cleared on this GPU")
    assert gpu_run.child_env(_ctx(tmp_path))["MLIT_CACHE_DIR"] == str(tmp_path / "out" / "cache")


def test_fault_experiments_run_in_smoke_mode(tmp_path):
    """--smoke --steps faults: each experiment a fresh process with its own Triton cache; on a CPU
    those that need CUDA (DISABLE_MMA_V3, num_stages, compute-sanitizer) say so in one line, the
    others run the dense layer and the pattern kernel through the interpreter (~30 s)."""
    out = tmp_path / "r0"
    res = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--steps", "faults", "--out", str(out),
                          "--budget", "300"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert json.loads((out / "steps.json").read_text())["faults"]["status"] == "ok"
    table = (out / "faults.md").read_text()
    cuda = torch.cuda.is_available()
    for name in ("dense", "pattern"):
        assert f"| {name} | - | PASS: " in table, table
    for name in ("dense-no-mma-v3", "dense-stages-1", "pattern-no-mma-v3", "dense-memcheck", "pattern-memcheck"):
        assert f"| {name} |" in table and (cuda or "skipped: needs CUDA" in table.split(f"| {name} |")[1].split("\n")[0])
    assert "TRITON_CACHE_DIR=" in table and table.count("launch _fused_fwd_kernel") >= 1
    summary = (out / "summary.md").read_text()
    assert "| faults | ok |" in summary and "## Fault experiments (faults.md)" in summary


def test_fault_experiment_verdicts():
    """A child that ended in a fault is named by the launch that did not finish."""
    gpu_faults = _faults_module()
    out = "launch _fused_fwd_kernel\ndone _fused_fwd_kernel\nlaunch _fused_bwd_weights_kernel\nRuntimeError: CUDA " \
          "error: an illegal memory access was encountered"
    assert gpu_faults.verdict(out, 1) == ("FAILED (exit 1) in _fused_bwd_weights_kernel (launch 2, 1 finished): "
                                          "RuntimeError: CUDA error: an illegal memory access was encountered")
    assert gpu_faults.verdict("launch k\ndone k\nRESULT PASS: fine", 0) == "PASS: fine"
    assert gpu_faults.verdict("launch k\n", None).startswith("timed out in k")


def _faults_module():
    spec = importlib.util.spec_from_file_location("gpu_faults", REPO / "bench" / "gpu_faults.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_failed_and_timed_out_steps_do_not_stop_the_next(tmp_path):
    ctx = _ctx(tmp_path)
    py = sys.executable
    steps = {
        "bad": gpu_run.Step("bad", [gpu_run.Command([py, "-c", "import sys; print('boom: bad input'); sys.exit(3)"]),
                                    gpu_run.Command([py, "-c", "print('second command still runs')"])]),
        "slow": gpu_run.Step("slow", [gpu_run.Command([py, "-c", "import time; print('sleeping', flush=True); "
                                                             "time.sleep(120)"])]),
        "good": gpu_run.Step("good", [gpu_run.Command([py, "-c", "print('| a | b |')"], stdout_to=ctx.out / "t.md")]),
    }
    records = gpu_run.run_steps(["bad", "slow", "good"], ctx, {"torch": "x"}, step_timeout={"": 20.0, "slow": 3.0},
                                export_to=tmp_path / "exp", steps_for=lambda ctx: steps)
    assert records["bad"]["status"] == "failed" and records["bad"]["exit_status"] == [3, 0]
    assert "boom: bad input" in records["bad"]["error_tail"]
    assert records["slow"]["status"] == "timed out" and records["slow"]["exit_status"] == [-15]  # ended by SIGTERM
    assert records["good"]["status"] == "ok" and records["good"]["exit_status"] == [0]
    assert (ctx.out / "t.md").read_text() == "| a | b |\n"  # a command's table, stdout alone
    assert "second command still runs" in (ctx.out / "bad.log").read_text()
    assert "sleeping" in (ctx.out / "slow.log").read_text()
    summary = (ctx.out / "summary.md").read_text()
    for row in ("| bad | failed |", "| slow | timed out |", "| good | ok |", "boom: bad input"):
        assert row in summary
    assert (tmp_path / "exp" / "out.tar.gz").is_file()

    # an earlier invocation's records stay; a step run again replaces its own
    records = gpu_run.run_steps(["bad"], ctx, {}, step_timeout=20.0, steps_for=lambda ctx: {"bad": steps["good"]})
    assert records["bad"]["status"] == "ok" and records["slow"]["status"] == "timed out"

    # no time left in the budget: skipped, not started
    records = gpu_run.run_steps(["good"], ctx, {}, step_timeout=3.0, end=time.monotonic() + 5,
                                steps_for=lambda ctx: steps)
    assert records["good"]["status"] == "skipped"


def test_train_step_resumes_a_run_directory_with_a_checkpoint(tmp_path):
    ctx = _ctx(tmp_path)
    fresh = gpu_run.train_step(ctx).commands[0].argv
    assert fresh[fresh.index("--out") + 1] == str(ctx.train_dir) and "--resume" not in fresh
    assert fresh[fresh.index("--data-dir") + 1] == str(ctx.data_dir)
    ctx.train_dir.mkdir(parents=True)
    (ctx.train_dir / "checkpoint.pt").write_bytes(b"")
    again = gpu_run.train_step(ctx).commands[0].argv
    assert again[again.index("--resume") + 1] == str(ctx.train_dir) and "--out" not in again
    assert "--epochs" not in gpu_run.train_step(_ctx(tmp_path, smoke=False)).commands[0].argv  # the recipe's 100

    # no data: the step fails before it starts, saying what to do
    record = gpu_run.run_step(gpu_run.train_step(ctx), ctx, time.monotonic() + 60)
    assert record["status"] == "failed" and "--prepare-data" in record["error_tail"]


def test_a_failed_training_step_mode_fails_the_step(tmp_path):
    (tmp_path / "train.csv").write_text("date,device,task,mode,model,batch,images_per_s\n"
                                        "d,x,train,eager-triton,XXS,256,1234.5\nd,x,train,compiled,XXS,256,nan\n")
    assert gpu_run.failed_modes(tmp_path / "train.csv") == {"status": "failed",
                                                            "note": "failed (see step.log): train XXS compiled"}


def test_summary_keeps_the_rows_of_a_report_cut_short(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "layer.log").write_text("\n$ python bench/gpu_report.py out/gpu_report.md\n# mlit_kernels GPU report\n"
                                   "| shape | N |\n| S-layer0 | 4133 |\n[exit status -15, time limit reached]\n"
                                   "\n$ python bench/meters.py --markdown\n| layer | m/d_h/t |\n")
    summary = gpu_run.write_summary(out, {}, {}).read_text()
    assert "gpu_report.py did not finish" in summary and "| S-layer0 | 4133 |" in summary
    assert "| layer | m/d_h/t |" not in summary  # the meters' output is not the report's


def test_step_timeouts_per_step():
    assert gpu_run.parse_timeouts("300") == {"": 300.0}
    assert gpu_run.parse_timeouts("tests=240, layer=300,100") == {"tests": 240.0, "layer": 300.0, "": 100.0}


def test_bad_arguments_name_the_argument(capsys):
    for argv, message in ((["--steps", "tests,nope"], "argument --steps"), (["--step-timeout", "0"], "--step-timeout"),
                          (["--step-timeout", "tests=5,oops=3"], "argument --step-timeout"),
                          (["--budget", "10"], "argument --budget"),
                          (["--export", "/tmp/x", "--out", "/tmp/a b"], "argument --out")):
        with pytest.raises(SystemExit) as exc:
            gpu_run.parse_args(argv)
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_prepare_data_names_a_missing_source(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPT), "--prepare-data", "--data-source", str(tmp_path / "none"),
                          "--data-dir", str(tmp_path / "fm")], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1 and "gpu_run.py: error: --data-source" in res.stderr
    assert "Traceback" not in res.stderr
