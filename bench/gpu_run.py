"""One command for a GPU session: versions, then every figure, each step time-boxed and kept.

    python bench/gpu_run.py --prepare-data        # here: copy Fashion-MNIST into .data/fashion-mnist
    python bench/gpu_run.py --out DIR [--steps tests,layer,...] [--budget S] [--export EXPORT]
    python bench/gpu_run.py --smoke --out /tmp/smoke   # CPU: tiny sizes everywhere, a few minutes

It records the versions (python, torch, triton, CUDA, the device name torch reports, date, git
commit) into DIR, then runs these steps (all of them, in this order, unless --steps names some),
each as subprocesses with a time limit, their stdout + stderr teed to DIR/<step>.log:

    faults  bench/gpu_faults.py -> faults.md: which hypothesis explains the dense kernels' illegal
            memory access (each experiment a fresh process with a fresh Triton cache; ~2 min)
    clear   `mlit doctor --clear --json` -> clearance.jsonl: every kernel family checked in a child
            process at mLiT-XXS's shapes (compiled first in parallel, one process a core); the
            verdicts land in DIR/cache/clearance.json (the later steps' machine cache: "auto" runs
            the cleared families) and the cleared ones in DIR/cleared.py, ready for the built-in
            table (mlit_kernels.common.clearance.BUILTIN)
    tests   tests/checks/test_gpu_hazards.py first (races, repeatability under tuning, capture on an
            untuned key, augmentation against the torch path), then the kernel, compile, capture
            and meter tests (compiled and run on the GPU with CUDA)
    layer   bench/gpu_report.py -> gpu_report.md (correctness per row, timings, roofline);
            bench/meters.py --markdown -> meters.md (CPU-counted launches, syncs, bytes)
    step    bench/bench_train.py -> train.csv (img/s of the training step per mode), one call per
            model and task so that the rows finished before a time limit are kept
    train   `mlit train` mLiT-XXS, full Fashion-MNIST, default recipe (100 epochs), data read from
            --data-dir (git-ignored, inside the checkout); the run directory (--train-dir, default
            DIR/train) holds metrics.jsonl, checkpoint.pt and, after `mlit plot`, the PNG curves
    bench   pytest bench/ --benchmark-only, one file at a time -> bench-<file>.json, bench.md

A failing or timed-out step never stops the next. At its time limit a step gets SIGTERM, then
SIGKILL after a grace period; the trainer answers SIGTERM with a checkpoint, so the train step is
resumable: run `--steps train` again with the same --train-dir and it continues (`--resume`) where
it stopped, until the recipe's epochs are done. DIR/summary.md (versions, each step's status,
wall time and last error lines, and every table found) is rewritten after each step, as is the
archive that --export writes (the device tool returns at most 8 files from $OUT, so the results
travel back as EXPORT/<DIR name>.tar.gz plus EXPORT/<DIR name>-summary.md). Steps that were run
into the same DIR by an earlier invocation keep their records (DIR/steps.json), so a step can be
re-run alone. Only the standard library here; torch is imported by the steps themselves.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
STEPS = ("faults", "clear", "tests", "layer", "step", "train", "bench")
FASHION_SOURCE = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                 "t10k-labels-idx1-ubyte.gz")
TRAIN_RECIPE = "table6-fashion_mnist"
DEFAULT_STEP_TIMEOUT_S = 600.0
BENCH_FIRST = ("moe", "attention", "augment", "train")  # bench/bench_<name>.py run first; the others follow by name
GRACE_S = 30.0  # SIGTERM -> SIGKILL; the trainer saves its checkpoint in this time
RESERVE_S = 20.0  # kept back from --budget for the after-step work (plots, summary, archive)
MIN_STEP_S = 10.0  # a step with less time left in --budget is skipped
AFTER_TIMEOUT_S = 60.0  # a step's after-work (mlit plot) time limit
ERROR_LINES = 15  # log lines quoted in the summary for a failed step
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")  # names the device tool brings back from $OUT


# ----------------------------------------------------------------------------------------------
# What a step runs


@dataclass
class Command:
    """One subprocess of a step; ``stdout_to`` also receives its stdout alone (a table); with
    ``only_if`` it runs only when that file exists."""

    argv: list[str]
    stdout_to: Path | None = None
    only_if: Path | None = None

    def __str__(self) -> str:
        return shlex.join(self.argv) + (f" > {self.stdout_to}" if self.stdout_to else "")


@dataclass
class Step:
    """A named group of commands under one time limit.

    ``prepare()`` runs first: an error message it returns fails the step before it starts.
    ``after`` commands run even when the commands failed or ran out of time (short limit of their own).
    ``review(timed_out)`` runs last: fields to add to the step's record ("note" is appended to ``note``;
    "status": "failed" marks a step whose commands exited 0 but whose results show a failure)."""

    name: str
    commands: list[Command]
    after: list[Command] = field(default_factory=list)
    note: str = ""
    prepare: Callable[[], str | None] | None = None
    review: Callable[[bool], dict] | None = None


@dataclass
class Context:
    out: Path
    smoke: bool
    cuda: bool
    data_dir: Path
    cache_dir: Path
    train_dir: Path
    train_backend: str
    no_compile: bool = False  # skip torch.compile (minutes of compiling on a short lease)

    @property
    def python(self) -> str:
        return sys.executable


def build_steps(ctx: Context) -> dict[str, Step]:
    """The steps' commands for this run (smoke: tiny sizes everywhere)."""
    py, out, smoke = ctx.python, ctx.out, ctx.smoke
    tests = ["tests/moe/test_kernels.py", "tests/moe/test_dispatch.py", "tests/moe/test_dense_tuning.py", "tests/checks/test_meter.py"]
    if smoke:  # the harness is what a smoke run proves; the full files take ~3 min here (CI runs them)
        tests = ["tests/checks/test_meter.py", "tests/checks/test_capture.py", "tests/moe/test_kernels.py::test_zero_and_one_token"]
    # -v: each test's outcome as it ends (a step stopped at its limit prints no summary)
    pytest = [py, "-m", "pytest", "-q" if smoke else "-v", "-p", "no:cacheprovider"] + pytest_timeout(smoke)
    first = [] if smoke else [  # what only a GPU shows (issue 19), first, with its printed figures (-rA);
        Command(pytest + ["tests/checks/test_gpu_hazards.py", "-rA"]),  # then every test that skips on a CPU
        Command(pytest + ["tests/", "-m", "gpu", "-rA", "--deselect", "tests/checks/test_gpu_hazards.py"]
                + (["--deselect", "tests/checks/test_compile.py::test_trainer_compile_cuda"] if ctx.no_compile else []))]
    clear = [py, "-m", "mlit", "doctor", "--clear", "--json"] + (["--families", "loss,mae_loss"] if smoke else [])
    steps = {"faults": Step("faults", [Command([py, "bench/gpu_faults.py", str(out / "faults.md")]
                                               + (["--smoke"] if smoke else []))]),
             "clear": Step("clear", [Command(clear, stdout_to=out / "clearance.jsonl")],
                           review=lambda _: write_cleared(out / "cache" / "clearance.json", out / "cleared.py")),
             "tests": Step("tests", first + [Command(pytest + tests)])}

    report = [py, "bench/gpu_report.py", str(out / "gpu_report.md")] + (["--smoke"] if smoke else []) + (
        ["--no-compile"] if ctx.no_compile else [])
    meters = [py, "bench/meters.py", "--markdown"] + (["--tokens", "1024", "--no-steps"] if smoke else [])
    steps["layer"] = Step("layer", [Command(report), Command(meters, stdout_to=out / "meters.md")])

    bench_train = [py, "bench/bench_train.py", "--csv", str(out / "train.csv")]
    if smoke:
        runs = [["--tasks", "train,pretrain", "--sizes", "XXS", "--batch-size", "8", "--steps", "1", "--warmup", "0"]]
    else:  # one call per model and task: each appends its rows to the CSV as soon as it is done
        runs = [["--tasks", "train", "--sizes", "XXS"], ["--tasks", "train", "--sizes", "XS"],
                ["--tasks", "train", "--sizes", "S"], ["--tasks", "pretrain", "--sizes", "XXS"]]
    if ctx.no_compile:
        bench_train += ["--no-compile"]
    steps["step"] = Step("step", [Command(bench_train + r) for r in runs],
                         review=lambda _: failed_modes(out / "train.csv"))

    steps["train"] = train_step(ctx)

    # one pytest per file, each with its own JSON: the files finished before a time limit are kept
    parts = sorted((p.stem[len("bench_"):] for p in (REPO / "bench").glob("bench_*.py")),
                   key=lambda part: (BENCH_FIRST.index(part) if part in BENCH_FIRST else len(BENCH_FIRST), part))
    steps["bench"] = Step("bench", [
        Command([py, "-m", "pytest", f"bench/bench_{part}.py", "--benchmark-only", "-q", "-p", "no:cacheprovider",
                 f"--benchmark-json={out / f'bench-{part}.json'}"]) for part in parts])
    return steps


def pytest_timeout(smoke: bool) -> list[str]:
    """A per-test time limit where pytest-timeout is installed: one hung kernel must not take the step."""
    import importlib.util

    return [] if smoke or importlib.util.find_spec("pytest_timeout") is None else ["--timeout", "150"]


def train_step(ctx: Context) -> Step:
    """`mlit train` of the default recipe; resumes the run directory when it holds a checkpoint."""
    run_dir = ctx.train_dir
    args = [ctx.python, "-m", "mlit", "train", "--recipe", TRAIN_RECIPE, "--model", "XXS",
            "--data-dir", str(ctx.data_dir), "--cache-dir", str(ctx.cache_dir), "--backend", ctx.train_backend,
            "--no-progress"]
    resuming = (run_dir / "checkpoint.pt").is_file()
    args += ["--resume", str(run_dir)] if resuming else ["--out", str(run_dir)]
    if ctx.smoke:
        args += ["--epochs", "1", "--warmup-epochs", "0.1", "--batch-size", "64", "--limit-train", "256",
                 "--limit-test", "128"]
    after = [Command([ctx.python, "-m", "mlit", "plot", str(run_dir)], only_if=run_dir / "metrics.jsonl")]
    note = f"resumed {run_dir}" if resuming else f"new run in {run_dir}"

    def check_data():
        missing = [f for f in FASHION_FILES if not (ctx.data_dir / f).is_file()]
        if missing:
            return (f"no Fashion-MNIST in {ctx.data_dir} (missing {', '.join(missing)}): run "
                    f"`python bench/gpu_run.py --prepare-data` in the checkout first, and carry that folder")
        return None

    return Step("train", [Command(args)], after=after, note=note, prepare=check_data,
                review=lambda timed_out: finish_train(ctx, timed_out))


def failed_modes(path: Path) -> dict:
    """bench_train.py reports a mode that raised as images/s nan and goes on: name them, fail the step."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        bad = [f"{r['task']} {r['model']} {r['mode']}" for r in csv.DictReader(f)
               if r.get("images_per_s", "").lower() in ("", "nan")]
    return {"status": "failed", "note": f"failed (see step.log): {', '.join(bad)}"} if bad else {}


# ----------------------------------------------------------------------------------------------
# Running a command: tee to the log (and a table file), time limit with SIGTERM then SIGKILL


def write_cleared(cache: Path, dest: Path) -> dict:
    """The cleared GPU verdicts of the machine cache ``cache`` as Python for the built-in table
    (``Verdict(...)`` lines) in ``dest``; returns what the step record keeps."""
    if not cache.is_file():
        return {"cleared": []}
    verdicts = [v for v in json.loads(cache.read_text())["verdicts"] if v["cleared"] and v["capability"] != "interpreter"]
    keys = ("family", "source_hash", "triton", "capability", "cleared", "device", "date")
    lines = [f"    Verdict({', '.join(f'{k}={v[k]!r}' for k in keys)})," for v in verdicts]
    dest.write_text("# cleared on this GPU: paste into mlit_kernels.common.clearance.BUILTIN\n" + "\n".join(lines) + "\n")
    return {"cleared": [v["family"] for v in verdicts]}


def child_env(ctx: Context) -> dict[str, str]:
    # the families the clear step cleared run under "auto" in every later step (this run's machine cache)
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg", MLIT_CACHE_DIR=str(ctx.out / "cache"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if not ctx.cuda:
        env.setdefault("TRITON_INTERPRET", "1")  # Triton kernels through the interpreter on the CPU
    return env


def _pump(pipe, sinks: list, lock: threading.Lock) -> None:
    """Copy a child's pipe to the sinks (binary files) as it arrives."""
    while True:
        chunk = pipe.read1(65536)
        if not chunk:
            break
        with lock:
            for sink in sinks:
                sink.write(chunk)
                sink.flush()


def run_command(cmd: Command, log, env: dict[str, str], deadline: float, grace: float = GRACE_S) -> tuple[int, bool]:
    """Run ``cmd`` in the checkout until it ends or ``deadline`` (time.monotonic()); returns (exit
    status, timed out). At the deadline its process group gets SIGTERM, after ``grace`` SIGKILL."""
    header = f"\n$ {cmd}\n".encode()
    log.write(header)
    log.flush()
    sys.stdout.buffer.write(header)
    sys.stdout.flush()
    table = open(cmd.stdout_to, "wb") if cmd.stdout_to else None
    try:
        proc = subprocess.Popen(cmd.argv, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except OSError as err:
        log.write(f"cannot start: {err}\n".encode())
        if table:
            table.close()
        return 127, False
    lock = threading.Lock()
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, [log, sys.stdout.buffer] + ([table] if table else []),
                                                  lock), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, [log, sys.stderr.buffer], lock), daemon=True)]
    for t in pumps:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    for t in pumps:  # a grandchild that kept the pipe open must not hang us
        t.join(timeout=10)
    if table:
        table.close()
    note = f"[exit status {proc.returncode}{', time limit reached' if timed_out else ''}]\n".encode()
    with lock:
        log.write(note)
        log.flush()
    return proc.returncode, timed_out


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def run_step(step: Step, ctx: Context, deadline: float) -> dict:
    """Run a step's commands (each even after an earlier one failed, none after the deadline), then
    its after-work; returns its record: status (ok, failed, timed out, or failed, then timed out),
    wall time, exit statuses."""
    env = child_env(ctx)
    t0 = time.monotonic()
    record = {"step": step.name, "started": _utc_now(), "commands": [str(c) for c in step.commands],
              "exit_status": [], "note": step.note}
    log_path = ctx.out / f"{step.name}.log"
    print(f"\n=== {step.name} ({max(0.0, deadline - t0):.0f} s at most) ===", flush=True)
    with open(log_path, "wb") as log:
        error = step.prepare() if step.prepare else None
        timed_out, failed = False, False
        if error:
            log.write(f"{error}\n".encode())
            record["exit_status"].append(None)
        for cmd in [] if error else step.commands:
            if time.monotonic() >= deadline:
                timed_out = True
                log.write(f"\n$ {cmd}\n[not started: time limit reached]\n".encode())
                record["exit_status"].append(None)
                continue
            rc, hit = run_command(cmd, log, env, deadline)
            timed_out |= hit
            failed |= rc != 0 and not hit
            record["exit_status"].append(rc)
        for cmd in step.after:
            if cmd.only_if is None or cmd.only_if.exists():
                run_command(cmd, log, env, time.monotonic() + AFTER_TIMEOUT_S, grace=5.0)
    record["wall_s"] = round(time.monotonic() - t0, 1)
    record["status"] = ("failed, then timed out" if failed and timed_out else "timed out" if timed_out
                        else "failed" if failed or error else "ok")
    if step.review:
        try:
            extra = step.review(timed_out)
        except Exception as err:  # noqa: BLE001 - the record is kept whatever the results look like
            extra = {"note": f"review failed: {type(err).__name__}: {err}"}
        note = extra.pop("note", "")
        record["note"] = "; ".join(n for n in (record["note"], note) if n)
        if extra.get("status") == "failed" and record["status"] == "ok":
            record["status"] = "failed"
        record.update({k: v for k, v in extra.items() if k != "status"})
    if record["status"] != "ok":
        record["error_tail"] = tail(log_path, ERROR_LINES)
    print(f"=== {step.name}: {record['status']} in {record['wall_s']} s ===", flush=True)
    return record


def finish_train(ctx: Context, timed_out: bool) -> dict:
    """Copy the run directory into DIR/train (when it lives elsewhere) and say where training stands."""
    run_dir, copy = ctx.train_dir, ctx.out / "train"
    if run_dir.is_dir() and run_dir.resolve() != copy.resolve():
        copy.mkdir(parents=True, exist_ok=True)
        for f in run_dir.iterdir():
            if f.is_file():
                shutil.copy2(f, copy / f.name)
    progress = train_progress(copy)
    if progress and progress["epochs_done"] == progress["epochs"]:
        return {"train": progress, "note": f"all {progress['epochs']} epochs done"}
    parts = [f"epoch {progress['epochs_done']}/{progress['epochs']} done"] if progress else []
    if (run_dir / "checkpoint.pt").is_file():
        parts += (["stopped at the time limit with a checkpoint"] if timed_out else []) + [
            f"continue with --steps train --train-dir {run_dir}"]
    return {"train": progress, "note": "; ".join(parts)}


def run_steps(names: list[str], ctx: Context, versions: dict, step_timeout: float | dict[str, float],
              end: float | None = None, export_to: Path | None = None, steps_for=build_steps) -> dict[str, dict]:
    """Run the named steps in order, whatever becomes of each; after each, save its record in
    DIR/steps.json (beside earlier invocations' records), rewrite summary.md and the export.
    ``step_timeout``: seconds, or {step: seconds} with "" for the others; ``end``: time.monotonic()
    by which everything must be over (--budget)."""
    limits = step_timeout if isinstance(step_timeout, dict) else {"": step_timeout}
    records = load_records(ctx.out)
    for name in names:
        step = steps_for(ctx)[name]  # built just before running: the train step looks for a checkpoint
        now = time.monotonic()
        deadline = now + limits.get(name, limits.get("", DEFAULT_STEP_TIMEOUT_S))
        budget_left = None if end is None else end - RESERVE_S - GRACE_S - now
        if budget_left is not None:
            deadline = min(deadline, now + budget_left)
        if budget_left is not None and budget_left < MIN_STEP_S:
            records[name] = {"step": name, "status": "skipped", "started": _utc_now(), "wall_s": 0.0,
                             "commands": [str(c) for c in step.commands], "exit_status": [],
                             "note": "not started: no time left in --budget"}
        else:
            records[name] = run_step(step, ctx, deadline)
        save_records(ctx.out, records)
        try:
            write_summary(ctx.out, versions, records)
            if export_to is not None:
                export(ctx.out, export_to)
        except Exception as err:  # noqa: BLE001 - an unreadable table must not stop the remaining steps
            print(f"warning: summary or export failed: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
    return records


# ----------------------------------------------------------------------------------------------
# Versions, records, summary, archive


VERSION_PROBE = r"""
import json, platform, sys
v = {"python": sys.version.split()[0], "platform": platform.platform()}
try:
    import torch
    v.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        v.update(device=torch.cuda.get_device_name(0), capability=f"sm_{p.major}{p.minor}",
                 device_memory_gib=round(p.total_memory / 2**30, 1), multiprocessors=p.multi_processor_count,
                 device_count=torch.cuda.device_count())
    else:
        v["device"] = "cpu: " + (platform.processor() or platform.machine())
except Exception as e:
    v["torch_error"] = f"{type(e).__name__}: {e}"
try:
    import triton
    v["triton"] = triton.__version__
except Exception as e:
    v["triton_error"] = f"{type(e).__name__}: {e}"
print(json.dumps(v))
"""


def record_versions(out: Path, commit: str | None) -> dict:
    """Versions of python, torch, triton, CUDA, the device, date, git commit -> versions.json/.md."""
    versions = {"date": _utc_now(), "command": shlex.join([sys.executable] + sys.argv)}
    try:
        res = subprocess.run([sys.executable, "-c", VERSION_PROBE], capture_output=True, text=True, timeout=120,
                             cwd=REPO)
        versions.update(json.loads(res.stdout.strip().splitlines()[-1]) if res.returncode == 0 and res.stdout.strip()
                        else {"probe_error": (res.stderr or res.stdout).strip()[-500:]})
    except (subprocess.TimeoutExpired, ValueError, IndexError) as err:
        versions["probe_error"] = f"{type(err).__name__}: {err}"
    versions["commit"] = commit or _git_commit()
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            res = subprocess.run([smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            versions["nvidia_smi"] = res.stdout.strip() or res.stderr.strip()
        except subprocess.TimeoutExpired:
            versions["nvidia_smi"] = "timed out"
    versions["cpus"] = os.cpu_count()
    (out / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    (out / "versions.md").write_text("\n".join(f"- {k}: {v}" for k, v in versions.items()) + "\n")
    print("\n".join(f"{k}: {v}" for k, v in versions.items()), flush=True)
    return versions


def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30, cwd=REPO)
        if head.returncode != 0:
            return "unknown (no git checkout here; pass --commit)"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=30, cwd=REPO).stdout.strip()
        return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown (git not available; pass --commit)"


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def tail(path: Path, n: int) -> str:
    """The last ``n`` non-blank lines of a log (progress bars' carriage returns count as line ends)."""
    lines = path.read_text(errors="replace").replace("\r", "\n").splitlines()
    return "\n".join([line for line in lines if line.strip()][-n:])


def load_records(out: Path) -> dict[str, dict]:
    path = out / "steps.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def save_records(out: Path, records: dict[str, dict]) -> None:
    tmp = out / "steps.json.tmp"
    tmp.write_text(json.dumps(records, indent=2) + "\n")
    os.replace(tmp, out / "steps.json")


def train_progress(run_dir: Path) -> dict | None:
    """Epochs done of the target, final and best test top-1, wall time, last images/s, curves."""
    metrics, recipe = run_dir / "metrics.jsonl", run_dir / "recipe.json"
    if not metrics.is_file():
        return None
    records = []
    for line in metrics.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill
    records = [r for r in records if not r.get("partial")]
    if not records:
        return None
    epochs = json.loads(recipe.read_text())["recipe"]["epochs"] if recipe.is_file() else None
    tested = [r for r in records if r.get("test_top1") is not None]
    best = max(tested, key=lambda r: r["test_top1"]) if tested else None
    last = records[-1]
    return {"epochs_done": int(last["epoch"]), "epochs": epochs, "final_test_top1": _round(last.get("test_top1"), 2),
            "best_test_top1": _round(best and best["test_top1"], 2), "best_epoch": best and best["epoch"],
            "wall_time_s": _round(last.get("wall_time_s"), 1),
            "images_per_s": _round(last.get("images_per_s"), 1), "train_loss": _round(last.get("train_loss"), 4),
            "curves": sorted(p.name for p in run_dir.glob("*.png"))}


def _round(value, digits: int):
    return round(value, digits) if isinstance(value, float) else value


def csv_table(path: Path) -> str:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return "(empty)"
    head = list(rows[0])
    return "\n".join(["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
                     + ["| " + " | ".join(str(r.get(k, "")) for k in head) + " |" for r in rows])


def bench_table(paths: list[Path]) -> str:
    """pytest-benchmark's JSON files as one markdown table: case, median, rounds, images/s if recorded."""
    lines = ["| case | median ms | min ms | rounds | images/s |", "| --- | --- | --- | --- | --- |"]
    benchmarks = []
    for path in paths:
        try:
            benchmarks += json.loads(path.read_text()).get("benchmarks", [])
        except ValueError as err:
            lines.append(f"| {path.name} unreadable: {err} | | | | |")
    for b in benchmarks:
        s, ips = b["stats"], b.get("extra_info", {}).get("images_per_s")
        lines.append(f"| {b['name']} | {s['median'] * 1e3:.3f} | {s['min'] * 1e3:.3f} | {s['rounds']} | "
                     f"{'' if ips is None else f'{ips:,.0f}'} |")
    return "\n".join(lines)


def command_output(log: Path, marker: str) -> str:
    """The output in a step's log of its command whose line contains ``marker``."""
    sections = re.split(r"^\$ ", log.read_text(errors="replace"), flags=re.M)
    return next((s.split("\n", 1)[1] for s in sections if "\n" in s and marker in s.split("\n", 1)[0]), "")


def _without_title(text: str) -> str:
    return "\n".join(line for line in text.strip().splitlines() if not line.startswith("# "))


def write_summary(out: Path, versions: dict, records: dict[str, dict]) -> Path:
    """DIR/summary.md: versions, every step's status, errors, and each table found in DIR."""
    lines = ["# GPU run summary", "", f"Written {_utc_now()} by `bench/gpu_run.py`.", "", "## Versions", ""]
    lines += [f"- {k}: {v}" for k, v in versions.items()]
    lines += ["", "## Steps", "", "| step | status | wall s | started | note |", "| --- | --- | --- | --- | --- |"]
    order = [s for s in STEPS if s in records] + [s for s in records if s not in STEPS]
    for name in order:
        r = records[name]
        lines.append(f"| {name} | {r['status']} | {r.get('wall_s', '')} | {r.get('started', '')} | "
                     f"{r.get('note', '')} |")
    for name in order:
        r = records[name]
        lines += ["", f"### {name}: {r['status']}", ""] + [f"- `{c}`" for c in r["commands"]]
        lines.append(f"- exit statuses: {r['exit_status']}; log: {name}.log")
        if r.get("error_tail"):
            lines += ["", "Last lines of the log:", "", "```", r["error_tail"], "```"]
    if (out / "faults.md").is_file():
        lines += ["", "## Fault experiments (faults.md)", "", _without_title((out / "faults.md").read_text())]
    if (out / "gpu_report.md").is_file():
        lines += ["", "## Layer: correctness and timings (gpu_report.md)", "",
                  _without_title((out / "gpu_report.md").read_text())]
    elif (out / "layer.log").is_file():  # cut short: the rows it printed before
        rows = [line for line in command_output(out / "layer.log", "gpu_report.py").splitlines()
                if line.startswith("|") or line.startswith("Device rates")]
        if rows:
            lines += ["", "## Layer: correctness and timings (from layer.log; gpu_report.py did not finish)", ""]
            lines += rows
    if (out / "meters.md").is_file() and (out / "meters.md").stat().st_size:
        lines += ["", "## Layer and step meters, CPU-counted (meters.md)", "", (out / "meters.md").read_text().strip()]
    if (out / "train.csv").is_file():
        lines += ["", "## Training step, images/s (train.csv)", "", csv_table(out / "train.csv")]
    progress = train_progress(out / "train")
    if progress:
        lines += ["", "## Fashion-MNIST training (train/metrics.jsonl)", "",
                  f"- epochs done: {progress['epochs_done']} of {progress['epochs']}",
                  f"- final test top-1: {progress['final_test_top1']}",
                  f"- best test top-1: {progress['best_test_top1']} (epoch {progress['best_epoch']})",
                  f"- wall time (run so far): {progress['wall_time_s']} s; last epoch "
                  f"{progress['images_per_s']} images/s; train loss {progress['train_loss']}",
                  f"- curves: {', '.join('train/' + c for c in progress['curves']) or 'none'}"]
    bench_json = sorted(out.glob("bench-*.json"))
    if bench_json:
        table = bench_table(bench_json)
        (out / "bench.md").write_text(table + "\n")
        lines += ["", f"## pytest bench/ --benchmark-only ({', '.join(p.name for p in bench_json)})", "", table]
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def export(out: Path, dest: Path) -> None:
    """DEST/<name>.tar.gz of DIR and DEST/<name>-summary.md, each replaced atomically."""
    dest.mkdir(parents=True, exist_ok=True)
    archive, tmp = dest / f"{out.name}.tar.gz", dest / f".{out.name}.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(out, arcname=out.name)
    os.replace(tmp, archive)
    shutil.copy2(out / "summary.md", dest / f"{out.name}-summary.md")


# ----------------------------------------------------------------------------------------------
# Data for the train step


def prepare_data(source: Path, dest: Path) -> list[Path]:
    """Copy the four Fashion-MNIST files from ``source`` into ``dest`` (a git-ignored folder inside
    the checkout, which the device tool's ``carry`` takes along); files already there are kept."""
    missing = [f for f in FASHION_FILES if not (source / f).is_file()]
    if missing:
        raise FileNotFoundError(f"--data-source {source} lacks {', '.join(missing)} "
                                "(apt-get install dataset-fashion-mnist)")
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in FASHION_FILES:
        src, dst = source / name, dest / name
        if not (dst.is_file() and dst.stat().st_size == src.stat().st_size):
            shutil.copy2(src, dst)
        copied.append(dst)
    return copied


# ----------------------------------------------------------------------------------------------


def parse_timeouts(text: str) -> dict[str, float]:
    """'300' -> {"": 300}; 'tests=240,layer=300' -> {"tests": 240, "layer": 300}; both may mix."""
    limits = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.rpartition("=")
        if name and name not in STEPS:
            raise ValueError(f"unknown step {name!r} in {text!r}; choose from {', '.join(STEPS)}")
        try:
            seconds = float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number of seconds") from None
        if not seconds > 0:
            raise ValueError(f"must be > 0 seconds, got {value}")
        limits[name] = seconds
    if not limits:
        raise ValueError("empty")
    return limits


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[1:]))
    p.add_argument("--out", type=Path, default=None, help="results folder (default .data/results/<UTC time>)")
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, run in the order given (default "
                   f"{','.join(STEPS)})")
    p.add_argument("--smoke", action="store_true", help="tiny sizes everywhere: the whole run on a CPU in minutes")
    p.add_argument("--step-timeout", default=str(DEFAULT_STEP_TIMEOUT_S),
                   help="seconds per step, or per named step: e.g. 300 or tests=240,layer=300 "
                        f"(steps not named: the bare number, else {DEFAULT_STEP_TIMEOUT_S:.0f})")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole invocation; steps are cut to fit it (e.g. 560 in a 600 s device call)")
    p.add_argument("--export", type=Path, default=None,
                   help="after each step write EXPORT/<out name>.tar.gz and EXPORT/<out name>-summary.md (e.g. $OUT)")
    p.add_argument("--commit", default=None, help="commit to record (default: git rev-parse HEAD, if git works)")
    p.add_argument("--data-dir", type=Path, default=REPO / ".data" / "fashion-mnist",
                   help="Fashion-MNIST files for the train step (default .data/fashion-mnist in the checkout)")
    p.add_argument("--cache-dir", type=Path, default=REPO / ".data" / "cache",
                   help="decoded-split cache of the train step (default .data/cache)")
    p.add_argument("--train-dir", type=Path, default=None,
                   help="run directory of the train step (default OUT/train); one outside OUT persists across "
                        "calls for --resume and is copied into OUT/train")
    p.add_argument("--no-compile", action="store_true",
                   help="no torch.compile in the layer and step tables (its compiling takes minutes of a short lease)")
    p.add_argument("--train-backend", default="auto", help="MoE backend of the train step (default auto)")
    p.add_argument("--prepare-data", action="store_true",
                   help="only copy Fashion-MNIST from --data-source into --data-dir, then exit")
    p.add_argument("--data-source", type=Path, default=FASHION_SOURCE, help=f"default {FASHION_SOURCE}")
    args = p.parse_args(argv)
    args.steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = [s for s in args.steps if s not in STEPS]
    if unknown or not args.steps:
        p.error(f"argument --steps: unknown step(s) {unknown}; choose from {', '.join(STEPS)}")
    if len(set(args.steps)) != len(args.steps):
        p.error("argument --steps: a step is named twice")
    try:
        args.step_timeout = parse_timeouts(args.step_timeout)
    except ValueError as err:
        p.error(f"argument --step-timeout: {err}")
    if args.budget is not None and not args.budget > RESERVE_S + GRACE_S:
        p.error(f"argument --budget: must be > {RESERVE_S + GRACE_S:.0f} s, got {args.budget}")
    if args.out is None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        args.out = REPO / ".data" / "results" / stamp
    if args.export is not None and not NAME_RE.match(args.out.name):
        p.error(f"argument --out: with --export the folder name must use letters, digits, '.', '_', '-' "
                f"only (the device tool drops other names), got {args.out.name!r}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare_data:
        try:
            files = prepare_data(args.data_source, args.data_dir)
        except FileNotFoundError as err:
            raise SystemExit(f"gpu_run.py: error: {err}") from None
        size = sum(f.stat().st_size for f in files) / 2**20
        print(f"{len(files)} files, {size:.1f} MiB in {args.data_dir}")
        rel = args.data_dir.resolve().relative_to(REPO) if args.data_dir.resolve().is_relative_to(REPO) else None
        print(f"device tool: carry {json.dumps([str(rel)]) if rel else '(outside the checkout: cannot be carried)'}")
        return 0
    t_start = time.monotonic()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"results in {out}", flush=True)
    versions = record_versions(out, args.commit)
    ctx = Context(out=out, smoke=args.smoke, cuda=bool(versions.get("cuda_available")),
                  data_dir=args.data_dir.resolve(), cache_dir=args.cache_dir.resolve(),
                  train_dir=(args.train_dir or out / "train").resolve(), train_backend=args.train_backend,
                  no_compile=args.no_compile)
    records = run_steps(args.steps, ctx, versions, args.step_timeout, t_start + args.budget if args.budget else None,
                        args.export)
    print(f"\n{out / 'summary.md'}")
    for name in args.steps:
        r = records[name]
        print(f"  {name:<6} {r['status']:<10} {r.get('wall_s', 0):>8.1f} s  {r.get('note', '')}")
    print(f"total {time.monotonic() - t_start:.1f} s")
    return 0 if all(records[name]["status"] == "ok" for name in args.steps) else 1


if __name__ == "__main__":
    sys.exit(main())
