"""Runs for the experiment tools: reading what a run wrote, summarising it, launching runs.

Reading. A run folder is a checkpoint folder (<output_dir>/base_checkpoints/<tag>/) with
train_metrics.jsonl (one row per step: loss, dt, val_bpb when evaluated, ...), svd_metrics.jsonl (one
row per layer-analysis, with layer_seconds and analysis_seconds) and config.json. A folder without
train_metrics.jsonl (a SLURM job's folder read next to its .out file) is read from the console log
instead: train.log there, or the file given. Everything here tolerates a run that is still writing (a
torn last line is skipped); a metrics file that holds a (step[, layer]) row twice is refused rather
than counted twice.

Launching. Every run is `python -m scripts.base_train_adaptive_svd <flags>` in its own process with
one thread (OMP_NUM_THREADS=1), its console in train.log and its command in command.txt next to the
checkpoint. `run_jobs` runs a list of them, at most `slots` at a time, each after the runs it needs;
a run whose files show it finished with the same command is reused, one stopped part-way continues
with --resume, and a stop signal reaches every running process, which saves and exits.
"""

import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from nanochat.checkpoint_manager import CHECKPOINT_NAME, CONFIG_NAME
from nanochat.common import UserError
from nanochat.run_files import row_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_METRICS, SVD_METRICS, COMMAND, CONSOLE = "train_metrics.jsonl", "svd_metrics.jsonl", "command.txt", "train.log"
TRAIN_MODULE = "scripts.base_train_adaptive_svd"
PAUSED = 5  # a step over this many times the median step was paused or starved (a shared machine)
LAYER_TYPES = {"attn.c_q": "c_q", "attn.c_k": "c_k", "attn.c_v": "c_v", "attn.c_proj": "attn.c_proj", "mlp.c_fc": "c_fc",
               "mlp.c_proj": "mlp.c_proj"}  # a layer's path inside its block -> its short name in reports


def layer_type(layer):
    """block3.attn.c_q -> attn.c_q."""
    return layer.split(".", 1)[1]

# ------------------------------------------------------------------------------------------------ reading

STEP_RE = re.compile(r"^step (\d+)/(\d+) \([^)]*\) \| loss: ([-+0-9.eEnaif]+) \| grad norm: ([-+0-9.eEnaif]+) \| "
                     r"lrm: ([0-9.]+) \| dt: ([0-9.]+)ms")
VAL_RE = re.compile(r"^Step (\d+) \| Validation bpb: ([0-9.]+)")
EXTRA_VAL_RE = re.compile(r"^Step (\d+) \| Extra validation bpb: ([0-9.]+)")


def read_jsonl(path):
    """Complete records of a (possibly growing) JSONL file; a torn last line is left out, a duplicate row refused."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break  # still being written
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    check_unique(records, path)
    return records


def check_unique(records, source):
    """UserError if two records share (step, layer): counting both would double that analysis or step."""
    first = {}
    for i, record in enumerate(records):
        key = row_key(record)
        if key[0] is None:
            continue
        if key in first:
            what = f"step {key[0]}" + (f", layer {key[1]}" if key[1] is not None else "")
            raise UserError(f"{source} holds two rows for {what} (rows {first[key] + 1} and {i + 1}); it was appended to "
                            f"twice (e.g. resumed by an older version): delete the repeated rows, or resume the run "
                            f"once more, which drops them")
        first[key] = i


def read_config(run_dir):
    path = os.path.join(run_dir, CONFIG_NAME)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def log_rows(path):
    """train_metrics-style rows (step, loss, grad_norm, lrm, dt, val_bpb, extra_val_bpb) parsed from a console
    log. A step that appears twice (a requeued job repeats the steps after its last checkpoint) keeps its later line."""
    rows = {}
    if not path or not os.path.exists(path):
        return []
    with open(path, errors="replace") as f:
        for line in f:
            m = STEP_RE.match(line)
            if m:
                step = int(m.group(1))
                rows[step] = {"step": step, "loss": float(m.group(3)), "grad_norm": float(m.group(4)),
                              "lrm": float(m.group(5)), "dt": float(m.group(6)) / 1000}
                continue
            for regex, key in ((VAL_RE, "val_bpb"), (EXTRA_VAL_RE, "extra_val_bpb")):
                m = regex.match(line)
                if m:
                    rows.setdefault(int(m.group(1)), {"step": int(m.group(1))})[key] = float(m.group(2))
    return [rows[s] for s in sorted(rows)]


def step_rows(run_dir, log=None):
    """(rows, source): the run's per-step rows from train_metrics.jsonl, or from its console log (`log`, else
    train.log in the folder) when the folder has no train_metrics.jsonl."""
    path = os.path.join(run_dir, TRAIN_METRICS)
    if os.path.exists(path):
        return read_jsonl(path), path
    log = log or os.path.join(run_dir, CONSOLE)
    return log_rows(log), log


def svd_records(run_dir):
    return read_jsonl(os.path.join(run_dir, SVD_METRICS))


def layer_records(records):
    """{layer: [records in step order]} of the analyses that reached a decision (skipped ones left out)."""
    layers = {}
    for r in records:
        if "mode_after" in r:
            layers.setdefault(r["layer"], []).append(r)
    return layers


def analysis_seconds(records):
    """Total analysis time: each analysis step's analysis_seconds, counted once per step."""
    per_step = {}
    for r in records:
        if isinstance(r.get("analysis_seconds"), (int, float)):
            per_step.setdefault(r["step"], r["analysis_seconds"])
    return sum(per_step.values())


def svd_summary(records):
    """What the analyses did, from svd_metrics.jsonl records (None when there are none).

    lowrank_share: share of layer-analyses whose mode after the analysis is low-rank (protected);
    to_lowrank/to_full: switches; mean_r: mean r_after over the protected ones; mean_k: mean learned
    directions over all layer-analyses; analysis_s: the analyses' time (analysis_seconds, once per step).
    """
    check_unique(records, "svd_metrics records")
    layers = layer_records(records)
    decided = [r for recs in layers.values() for r in recs]
    if not decided:
        return None
    low = [r for r in decided if r["mode_after"] == "lowrank"]
    return {
        "layers": len(layers), "layer_analyses": len(decided), "lowrank_share": len(low) / len(decided),
        "to_lowrank": sum(r["action"] == "to_lowrank" for r in decided), "to_full": sum(r["action"] == "to_full" for r in decided),
        "mean_r": sum(r["r_after"] for r in low) / len(low) if low else None,
        "mean_k": sum(r["k"] for r in decided) / len(decided),
        "analysis_s": analysis_seconds(records),
        "last_step": max(r["step"] for r in decided),
    }


def evaluations(rows, key="val_bpb"):
    """[(step, value)] of the rows that carry `key`, in step order."""
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]


def summarize(run_dir, log=None):
    """One run's summary from its files: steps, tokens, evaluations, step times and what the analyses did.

    loop_s: summed step time (the console's "total time"; includes the analyses, excludes evaluations);
    median_step_s: the median step, robust to pauses on a shared machine (and to the analysis steps);
    time_estimate_s = steps x median step + analysis time: the run's cost without the pauses.
    """
    rows, source = step_rows(run_dir, log)
    cfg = read_config(run_dir) or {}
    batch = cfg.get("train_config", {}).get("total_batch_size")
    dts = [r["dt"] for r in rows if isinstance(r.get("dt"), (int, float))]
    vals = evaluations(rows)
    extra = evaluations(rows, "extra_val_bpb")
    median = statistics.median(dts) if dts else None
    svd = svd_summary(svd_records(run_dir))
    analysis = svd["analysis_s"] if svd else 0.0
    return {
        "run_dir": run_dir, "source": source, "steps": len(dts), "last_step": rows[-1]["step"] if rows else None,
        "tokens": len(dts) * batch if batch else None,
        "first_val_bpb": vals[0][1] if vals else None, "final_val_bpb": vals[-1][1] if vals else None,
        "min_val_bpb": min(v for _, v in vals) if vals else None, "final_extra_val_bpb": extra[-1][1] if extra else None,
        "loop_s": sum(dts) if dts else None, "median_step_s": median, "mean_step_s": sum(dts) / len(dts) if dts else None,
        "paused_steps": sum(d > PAUSED * median for d in dts) if dts else None,
        "analysis_s": analysis, "time_estimate_s": len(dts) * median + analysis if dts else None,
        "svd": svd,
    }


def finished(run_dir, needs=("val_bpb",)):
    """The folder holds the whole run: config.json at the last step, the checkpoint, and the last step's row in
    train_metrics.jsonl with every value in `needs` (the final evaluation)."""
    cfg = read_config(run_dir)
    if not cfg or cfg.get("step") != cfg.get("num_iterations") or not os.path.exists(os.path.join(run_dir, CHECKPOINT_NAME)):
        return False
    rows = read_jsonl(os.path.join(run_dir, TRAIN_METRICS))
    last = rows[-1] if rows else {}
    return last.get("step") == cfg["step"] and all(isinstance(last.get(k), float) for k in needs)


def run_settings(run_dir):
    """The run's train_config (every svd_* threshold included) and where it came from: config.json (written with
    every checkpoint) first; for a run that has not saved yet, its command.txt parsed with the training script's
    own flag definitions, so unspecified thresholds take the same defaults the run itself took."""
    cfg = read_config(run_dir)
    if cfg and "train_config" in cfg:
        return cfg["train_config"], os.path.join(run_dir, CONFIG_NAME)
    cmd_path = os.path.join(run_dir, COMMAND)
    if os.path.exists(cmd_path):
        import dataclasses

        from nanochat.adaptive_cycle import AdaptiveConfig
        from nanochat.cli import parse_args
        with open(cmd_path) as f:
            words = shlex.split(f.read())
        argv = words[words.index(TRAIN_MODULE) + 1:] if TRAIN_MODULE in words else [w for w in words if w.startswith("--")]
        return dataclasses.asdict(parse_args(AdaptiveConfig, argv, prog="", description="")), cmd_path
    return None, None


# ------------------------------------------------------------------------------------------------ formatting

def fmt(value, spec=".4f"):
    """A table cell: n/a for a missing value, yes/no for a bool, ints with thousands separators."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    return format(value, spec)


def fmt_pm(mean, sd, spec=".4f"):
    """'mean ± sd' (just the mean when there is no sd)."""
    return fmt(mean, spec) if sd is None else f"{fmt(mean, spec)} ± {fmt(sd, spec)}"


def fmt_interval(iv, spec=".4f"):
    """'[lo, hi]' of a stats.t_interval result (n/a for fewer than two values)."""
    return "n/a" if iv["lo"] is None else f"[{fmt(iv['lo'], spec)}, {fmt(iv['hi'], spec)}]"


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


# ------------------------------------------------------------------------------------------------ launching

def flag_name(arg):
    return arg.lstrip("-").split("=")[0].replace("-", "_")


def check_reserved(train_argv, reserved, who):
    """A runner sets the flags in `reserved` itself: one of them among the training flags is an error."""
    for arg in train_argv:
        if arg.startswith("--") and flag_name(arg) in reserved:
            raise UserError(f"--{flag_name(arg)} is set by {who} itself; leave it out of the training flags")


def with_defaults(train_argv, defaults):
    """The training flags plus the runner's defaults ({name: value}) that they do not give themselves."""
    given = {flag_name(a) for a in train_argv if a.startswith("--")}
    return [f"--{k}={v}" for k, v in defaults.items() if k not in given] + list(train_argv)


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
        cmd = [sys.executable, "-m", TRAIN_MODULE, *self.argv, "--resume=true" if mode == "resume" else "--overwrite=true"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        log = open(os.path.join(self.run_dir, CONSOLE), "a" if mode == "resume" else "w")
        try:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
        finally:
            log.close()


def run_jobs(jobs, slots, force=False, say=print):
    """Run every job, at most `slots` at once, each after the jobs in its `after`; returns {tag: how it ran}.
    Finished runs are reused. A stop signal (Ctrl-C, SIGTERM) reaches every running process, which saves its
    checkpoint; then, or once a run fails, no new run starts, the running ones finish, and a one-line error
    says what to do."""
    by_tag = {job.tag: job for job in jobs}
    for job in jobs:
        for need in job.after:
            if need not in by_tag:
                raise ValueError(f"job {job.tag} needs {need}, which is not in the list")
    pending, running, done, failed, started = list(jobs), {}, set(), [], {}
    stop = {"signal": None}

    def forward(signum, frame):  # SIGTERM to the runner: pass it on, let each run save, then stop
        stop["signal"] = signum
        for proc in running.values():
            proc.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
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
        signal.signal(signal.SIGTERM, previous)
    if stop["signal"]:
        raise UserError(f"stopped by signal {stop['signal']}; the runs saved what they had: run the same command again "
                        f"to continue")
    if failed:
        job, rc = failed[0]
        how = (f"was stopped by signal {rc - 128} (exit status {rc}) after saving its checkpoint" if rc > 128  # not by us
               else f"failed (exit status {rc})" if rc else "ended before its last step")
        raise UserError(f"{job.tag} {how}; see {os.path.join(job.run_dir, CONSOLE)}; fix it and run the same command "
                        f"again (finished runs are reused)")
    if pending:
        raise ValueError(f"jobs {[j.tag for j in pending]} wait for each other")
    return {job.tag: job.status for job in jobs}
