"""Launching the training runs of an experiment, each in its own process, and the flags they get.

Every run is `python -m scripts.base_train_adaptive_svd <flags>` with one thread (OMP_NUM_THREADS=1), its
console in train.log, its command in command.txt and its provenance in provenance.json (one entry per
start: the code's git commit and whether the tree had changes, torch and Python versions, CPU model,
threads and GPU, and once the run finished, the process' wall time) next to the checkpoint. `run_jobs` runs
a list of them, at most `slots` at a time, each after the runs it needs; a run whose files show it finished
with the same command is reused, one stopped part-way continues with --resume, and a stop signal (Ctrl-C,
SIGTERM, SLURM's SIGUSR1) reaches every running process, which saves and exits; the runner then exits with
128 + the signal, as a training run does. A run folder that a live training process holds (the same
experiment started twice) stops the runner in one line before anything starts.
"""

import datetime
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from nanochat.checkpoint_manager import CHECKPOINT_NAME
from nanochat.cli import flag_name, merge_flags
from nanochat.common import UserError
from nanochat.run_lock import ensure_free
from nanochat.train import TRAIN_METRICS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = "command.txt"  # the run's command line, as a fresh start runs it
PROVENANCE = "provenance.json"  # who ran the run: one entry per start of its process
CONSOLE = "train.log"  # the run's console output, for people (the readers read the JSONL files)
TRAIN_MODULE = "scripts.base_train_adaptive_svd"


def parse_seeds(text):
    """--seeds: a comma list of distinct integers."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be a comma list of integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds must name at least one seed, each once; got {text!r}")
    return seeds


def check_reserved(train_argv, reserved, who):
    """A runner sets the flags in `reserved` itself: one of them among the training flags is an error."""
    for arg in train_argv:
        if arg.startswith("--") and flag_name(arg) in reserved:
            raise UserError(f"--{flag_name(arg)} is set by {who} itself; leave it out of the training flags")


def check_pinned_dtype(cfg, who):
    """The runs of one experiment share one matmul dtype, which the runner pins (float32 unless the training flags
    give float32 or bfloat16): with --dtype=auto each run would decide for itself by timing a bf16 matmul under the
    load of its moment, so one run of a comparison could train in bf16 and the next in fp32."""
    if cfg.dtype == "auto":
        raise UserError(f"--dtype=auto lets each run of {who} choose its own matmul dtype (bf16 or fp32 by a timing under "
                        f"the load of the moment); give --dtype=float32 (the default) or --dtype=bfloat16")


def with_defaults(train_argv, defaults):
    """The training flags plus the runner's defaults ({name: value}) that they do not give themselves."""
    return merge_flags([f"--{k}={v}" for k, v in defaults.items()], train_argv)


def training_argv(flags, train_argv):
    """The training script's arguments: the runner's own flags ({name: value}) and the shared ones."""
    return [f"--{k}={v}" for k, v in flags.items()] + list(train_argv)


def command_line(argv):
    """The shell command of a training run (as command.txt and the reports show it)."""
    return shlex.join(["python", "-m", TRAIN_MODULE, *argv])


def write_command(run_dir, argv):
    """command.txt: the run's command, as a fresh start runs it (read by scripts.monitor_svd and to reuse a run)."""
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, COMMAND), "w") as f:
        f.write(command_line(argv) + "\n")


def read_command(run_dir):
    path = os.path.join(run_dir, COMMAND)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read().strip()


def command_flags(command):
    """The training script's arguments in a command line: what follows the module, else every --flag in it."""
    words = shlex.split(command)
    return words[words.index(TRAIN_MODULE) + 1:] if TRAIN_MODULE in words else [w for w in words if w.startswith("--")]


def _git(*args):
    try:
        r = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus():
    """The GPUs nvidia-smi lists (asking torch would hold a CUDA context in the launcher for the whole experiment)."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in r.stdout.splitlines() if line.strip()] if r.returncode == 0 else []


def provenance(threads):
    """What a run's numbers depend on besides its command: the code (git commit; dirty = uncommitted changes in
    tracked files), torch, Python, the machine. The dtype a run resolved is in its config.json."""
    import torch
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "git_commit": _git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status),
            "torch": torch.__version__, "python": platform.python_version(), "cpu": _cpu_model(),
            "cpu_count": os.cpu_count(), "threads": threads, "gpus": _gpus()}


def record_provenance(run_dir, mode, threads):
    path = os.path.join(run_dir, PROVENANCE)
    entries = []
    if mode == "resume" and os.path.exists(path):
        with open(path) as f:
            entries = json.load(f)
    entries.append({"mode": mode, **provenance(threads)})
    with open(path + ".tmp", "w") as f:
        json.dump(entries, f, indent=1)
    os.replace(path + ".tmp", path)


def record_finish(run_dir, wall_s):
    """The process of the latest start ran for wall_s seconds (start-up, evaluations and saves included) and finished."""
    path = os.path.join(run_dir, PROVENANCE)
    with open(path) as f:
        entries = json.load(f)
    entries[-1]["wall_s"] = round(wall_s, 1)
    with open(path + ".tmp", "w") as f:
        json.dump(entries, f, indent=1)
    os.replace(path + ".tmp", path)


class Stopped(UserError):
    """The runner stopped on a signal once its runs had saved: exit status 128 + the signal, as for a training run."""

    def __init__(self, signum):
        super().__init__(f"stopped by signal {signum}; the runs saved what they had: run the same command again to continue")
        self.exit_status = 128 + signum


@dataclass
class Job:
    """One training run of an experiment: its folder, its arguments (without --overwrite/--resume), the tags of
    the runs it needs first, and `complete(run_dir)`: whether the folder's files hold the whole run."""
    tag: str
    run_dir: str
    argv: list
    complete: object
    after: tuple = ()
    status: str = field(default="", init=False)

    def state(self, force):
        """'done' (reuse), 'resume' (its checkpoint, same command) or 'fresh'; refuses another command's run."""
        has_run = any(os.path.exists(os.path.join(self.run_dir, n)) for n in (CHECKPOINT_NAME, TRAIN_METRICS, COMMAND))
        if force or not has_run:
            return "fresh"
        previous = read_command(self.run_dir)
        if previous is not None and previous != command_line(self.argv):
            raise UserError(f"{self.run_dir} holds a run of another command ({os.path.join(self.run_dir, COMMAND)}); "
                            f"use another --out, or --force=true to replace it")
        if self.complete(self.run_dir):
            return "done"
        return "resume" if os.path.exists(os.path.join(self.run_dir, CHECKPOINT_NAME)) else "fresh"

    def start(self, mode):
        write_command(self.run_dir, self.argv)
        record_provenance(self.run_dir, mode, threads=1)
        cmd = [sys.executable, "-m", TRAIN_MODULE, *self.argv, "--resume=true" if mode == "resume" else "--overwrite=true"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        log = open(os.path.join(self.run_dir, CONSOLE), "a" if mode == "resume" else "w")
        try:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        finally:
            log.close()


def run_jobs(jobs, slots, force=False, say=print):
    """Run every job, at most `slots` at once, each after the jobs in its `after`; returns {tag: how it ran}.
    Finished runs are reused. A stop signal (Ctrl-C, SIGTERM, SIGUSR1) reaches every running process, which saves
    its checkpoint; then no new run starts and Stopped (exit status 128 + the signal) says to run again. Once a
    run fails, no new run starts, the running ones finish, and a one-line error says what to do."""
    by_tag = {job.tag: job for job in jobs}
    for job in jobs:
        for need in job.after:
            if need not in by_tag:
                raise ValueError(f"job {job.tag} needs {need}, which is not in the list")
        ensure_free(job.run_dir)  # before anything starts: a job would rewrite command.txt and train.log of a live run
    pending, running, done, failed, started = list(jobs), {}, set(), [], {}
    stop = {"signal": None}

    def forward(signum, frame):  # SIGTERM or SIGUSR1 to the runner: pass it on, let each run save, then stop
        stop["signal"] = signum
        for proc in running.values():
            proc.send_signal(signum)  # a run that got it already (a signal to the process group) just saves once

    # a SLURM job sends SIGUSR1 before the time limit; its launcher starts the runner with it ignored, which this
    # handler replaces (and the runs install their own)
    previous = {signum: signal.signal(signum, forward) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        while True:
            progress = False
            for job in list(pending):
                if failed or stop["signal"] or len(running) >= slots:
                    break
                if not all(need in done for need in job.after):
                    continue
                pending.remove(job)
                progress = True
                job.status = job.state(force)
                if job.status == "done":
                    say(f"reusing {job.tag}: finished in {job.run_dir}")
                    done.add(job.tag)
                    continue
                say(f"{'continuing' if job.status == 'resume' else 'running'} {job.tag}: {command_line(job.argv)}")
                running[job.tag] = job.start(job.status)
                started[job.tag] = time.time()
            for tag, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[tag]
                progress = True
                if by_tag[tag].complete(by_tag[tag].run_dir):
                    record_finish(by_tag[tag].run_dir, time.time() - started[tag])
                    say(f"finished {tag} ({time.time() - started[tag]:.0f} s)")
                    done.add(tag)
                elif not stop["signal"]:
                    failed.append((by_tag[tag], proc.returncode))
            if not running and (failed or stop["signal"] or not pending or not progress):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        stop["signal"] = signal.SIGINT  # the terminal sent it to every run too: they save and exit
        for proc in running.values():
            proc.wait()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if stop["signal"]:
        raise Stopped(stop["signal"])
    if failed:
        job, rc = failed[0]
        how = (f"was stopped by signal {rc - 128} (exit status {rc}) after saving its checkpoint" if rc > 128  # not by us
               else f"failed (exit status {rc})" if rc else "ended before its last step")
        raise UserError(f"{job.tag} {how}; see {os.path.join(job.run_dir, CONSOLE)}; fix it and run the same command "
                        f"again (finished runs are reused)")
    if pending:
        raise ValueError(f"jobs {[j.tag for j in pending]} wait for each other")
    return {job.tag: job.status for job in jobs}
