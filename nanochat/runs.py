"""Reading what a run wrote, and summarising it: the experiment tools' one view of a run folder.

A run folder is a checkpoint folder (<output_dir>/base_checkpoints/<tag>/) with train_metrics.jsonl (one
row per step: loss, dt, val_bpb when evaluated, ...), svd_metrics.jsonl (one row per layer-analysis, with
layer_seconds and analysis_seconds), config.json and command.txt. The console log (train.log) is for people
and never read here.
Everything here tolerates a run that is still writing (a torn last line is skipped); a metrics file that
holds a (step[, layer]) row twice is refused rather than counted twice.

A kept run (`keep_run`) is what an experiment keeps of a finished run for good, small enough for the
repository: config.json, command.txt, provenance.json (who ran it: code, torch, machine), data_position.json
(the final data loader state, from the checkpoint) and both metrics files gzipped. Every reader here reads
a kept folder as it reads a run folder (a metrics file may be `<name>.gz`), so the reports are computed
from the kept files and rebuilt from them alone.
"""

import dataclasses
import gzip
import json
import os
import shutil
import statistics
import sys

from nanochat.adaptive_cycle import SVD_METRICS, AdaptiveConfig
from nanochat.adaptive_svd import Action, Mode
from nanochat.checkpoint_manager import CHECKPOINT_NAME, CONFIG_NAME
from nanochat.cli import parse_args
from nanochat.common import UserError
from nanochat.jobs import COMMAND, PROVENANCE, command_flags, read_command
from nanochat.run_files import row_key
from nanochat.train import TRAIN_METRICS

PAUSED = 5  # a step over this many times the median step was paused or starved (a shared machine)
LAYER_TYPES = {"attn.c_q": "c_q", "attn.c_k": "c_k", "attn.c_v": "c_v", "attn.c_proj": "attn.c_proj", "mlp.c_fc": "c_fc",
               "mlp.c_proj": "mlp.c_proj"}  # a layer's path inside its block -> its short name in reports


def layer_type(layer):
    """block3.attn.c_q -> attn.c_q."""
    return layer.split(".", 1)[1]


def read_jsonl(path):
    """Complete records of a (possibly growing) JSONL file, or of its kept copy `path`.gz; a torn last line is left
    out, a duplicate row refused."""
    records = []
    if not os.path.exists(path):
        if not os.path.exists(path + ".gz"):
            return records
        path += ".gz"
    with (gzip.open(path, "rt") if path.endswith(".gz") else open(path)) as f:
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


def step_rows(run_dir):
    """The run's per-step rows from its train_metrics.jsonl; a folder without one is a UserError."""
    path = os.path.join(run_dir, TRAIN_METRICS)
    if not os.path.exists(path) and not os.path.exists(path + ".gz"):
        raise UserError(f"{path} does not exist: give the checkpoint folder of a run (the training script writes "
                        f"{TRAIN_METRICS} there from its first step)")
    return read_jsonl(path)


class Follower:
    """The complete new records of a growing JSONL file at each call (scripts.monitor_svd follows a live run with
    it); starts over if the file is replaced or truncated."""

    def __init__(self, path):
        self.path, self.offset, self.buffer, self.inode = path, 0, "", None

    def new_records(self):
        if not os.path.exists(self.path):
            return []
        st = os.stat(self.path)
        if self.inode is not None and (st.st_ino != self.inode or st.st_size < self.offset):
            self.offset, self.buffer = 0, ""  # a new run rewrote the file
        self.inode = st.st_ino
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset = f.tell()
        self.buffer += chunk
        lines = self.buffer.split("\n")
        self.buffer = lines.pop()  # an incomplete last line waits for its end
        out = []
        for line in lines:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    print(f"(unreadable line skipped: {line[:60]}...)", file=sys.stderr)
        return out


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
    low = [r for r in decided if r["mode_after"] == Mode.LOWRANK]
    return {
        "layers": len(layers), "layer_analyses": len(decided), "lowrank_share": len(low) / len(decided),
        "to_lowrank": sum(r["action"] == Action.TO_LOWRANK for r in decided),
        "to_full": sum(r["action"] == Action.TO_FULL for r in decided),
        "mean_r": sum(r["r_after"] for r in low) / len(low) if low else None,
        "mean_k": sum(r["k"] for r in decided) / len(decided),
        "analysis_s": analysis_seconds(records),
        "last_step": max(r["step"] for r in decided),
    }


def evaluations(rows, key="val_bpb"):
    """[(step, value)] of the rows that carry `key`, in step order."""
    return [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]


def summarize(run_dir):
    """One run's summary from its files: steps, tokens, evaluations, step times and what the analyses did.

    loop_s: summed step time (the console's "total time"; includes the analyses, excludes evaluations);
    median_step_s: the median step, robust to pauses on a shared machine (and to the analysis steps);
    time_estimate_s = steps x median step + analysis time: the run's cost without the pauses.
    """
    rows = step_rows(run_dir)
    cfg = read_config(run_dir) or {}
    batch = cfg.get("train_config", {}).get("total_batch_size")
    dts = [r["dt"] for r in rows if isinstance(r.get("dt"), (int, float))]
    vals = evaluations(rows)
    extra = evaluations(rows, "extra_val_bpb")
    median = statistics.median(dts) if dts else None
    svd = svd_summary(svd_records(run_dir))
    analysis = svd["analysis_s"] if svd else 0.0
    return {
        "run_dir": run_dir, "source": os.path.join(run_dir, TRAIN_METRICS), "steps": len(dts),
        "last_step": rows[-1]["step"] if rows else None,
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
    command = read_command(run_dir)
    if command is not None:
        cfg = parse_args(AdaptiveConfig, command_flags(command), prog="", description="")
        return dataclasses.asdict(cfg), os.path.join(run_dir, COMMAND)
    return None, None


DATA_POSITION = "data_position.json"  # a kept run's final data loader state (every rank's), from its checkpoint


def data_position(run_dir):
    """Every rank's data loader state at the run's end: data_position.json of a kept run, else the checkpoint's."""
    path = os.path.join(run_dir, DATA_POSITION)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    from nanochat.checkpoint_manager import load_checkpoint
    return load_checkpoint(os.path.join(run_dir, CHECKPOINT_NAME))["loop"]["dataloader"]


def provenance(run_dir):
    """The run's provenance.json (one entry per start of its process: nanochat.jobs.provenance), [] without one."""
    path = os.path.join(run_dir, PROVENANCE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def made_with(run_dirs):
    """The distinct (commit, uncommitted changes, torch, Python, CPU, threads, GPUs) the runs were made with, in the
    order first met, each with the number of process starts that had it."""
    seen = {}
    for run_dir in run_dirs:
        for entry in provenance(run_dir):
            key = json.dumps({k: entry.get(k) for k in ("git_commit", "git_dirty", "torch", "python", "cpu", "threads", "gpus")},
                             sort_keys=True)
            seen[key] = seen.get(key, 0) + 1
    return [{**json.loads(k), "starts": n} for k, n in seen.items()]


def _gzip_copy(src, dst):
    """A gzip copy whose bytes depend on the content alone (no name or time in the header), so keeping the same
    run twice writes the same file."""
    with open(src, "rb") as f_in, open(dst + ".tmp", "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as f_out:
            shutil.copyfileobj(f_in, f_out)
    os.replace(dst + ".tmp", dst)


def keep_run(run_dir, dest):
    """Keep a finished run's files in `dest` (replacing what was kept of it): config.json, command.txt,
    provenance.json, data_position.json, and train_metrics.jsonl / svd_metrics.jsonl gzipped."""
    os.makedirs(dest, exist_ok=True)
    for name in (CONFIG_NAME, COMMAND, PROVENANCE):
        if os.path.exists(os.path.join(run_dir, name)):
            shutil.copyfile(os.path.join(run_dir, name), os.path.join(dest, name))
    with open(os.path.join(dest, DATA_POSITION), "w") as f:
        json.dump(data_position(run_dir), f)
    for name in (TRAIN_METRICS, SVD_METRICS):
        if os.path.exists(os.path.join(run_dir, name)):
            _gzip_copy(os.path.join(run_dir, name), os.path.join(dest, name + ".gz"))
