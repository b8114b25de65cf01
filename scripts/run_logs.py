"""Reading a run's files: the console log, svd_metrics.jsonl and config.json (finished, running or copied back).

A run folder is a checkpoint folder (<output_dir>/base_checkpoints/<tag>/). Its console log is found as
train.log there (what scripts.compare_runs writes), or given explicitly (e.g. a SLURM .out file).
Everything here tolerates a run that is still writing: a half-written last JSONL line is skipped.
A metrics file holds each (step[, layer]) row once (a resumed run drops the rows it repeats); a file
with a duplicate row is refused rather than counted twice.
"""

import json
import os
import re

from nanochat.common import UserError
from nanochat.run_files import row_key

STEP_RE = re.compile(r"^step (\d+)/(\d+) \([^)]*\) \| loss: ([-+0-9.eEnaif]+) \| grad norm: ([-+0-9.eEnaif]+) \| "
                     r"lrm: ([0-9.]+) \| dt: ([0-9.]+)ms")
VAL_RE = re.compile(r"^Step (\d+) \| Validation bpb: ([0-9.]+)")
PEAK_RE = re.compile(r"^Peak memory usage: ([0-9.]+) MiB")
TIME_RE = re.compile(r"^Total training time: ([0-9.]+)m")
MIN_RE = re.compile(r"^Minimum validation bpb: ([0-9.]+)")
RESUME_RE = re.compile(r"^Resumed from .* at step (\d+)")
SVD_TIME_RE = re.compile(r"^=== SVD Analysis complete === \((\d+) ms\)")


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
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def find_log(run_dir, log=None):
    if log:
        return log
    path = os.path.join(run_dir, "train.log")
    return path if os.path.exists(path) else None


def parse_log(path):
    """Per-step loss (the console's debiased EMA), grad norm, lrm, dt; val bpb points; end-of-run lines."""
    out = {"steps": [], "loss": [], "grad_norm": [], "lrm": [], "dt_ms": [], "val_steps": [], "val_bpb": [],
           "num_iterations": None, "svd_analysis_ms": [], "peak_memory_mib": None, "train_time_min": None, "min_val_bpb": None, "resumed_at": None}
    if not path or not os.path.exists(path):
        return out
    with open(path, errors="replace") as f:
        for line in f:
            m = STEP_RE.match(line)
            if m:
                out["steps"].append(int(m.group(1)))
                out["num_iterations"] = int(m.group(2))
                for key, g in (("loss", 3), ("grad_norm", 4), ("lrm", 5), ("dt_ms", 6)):
                    out[key].append(float(m.group(g)))
                continue
            for regex, key in ((PEAK_RE, "peak_memory_mib"), (TIME_RE, "train_time_min"), (MIN_RE, "min_val_bpb")):
                m = regex.match(line)
                if m:
                    out[key] = float(m.group(1))
            m = VAL_RE.match(line)
            if m:
                out["val_steps"].append(int(m.group(1)))
                out["val_bpb"].append(float(m.group(2)))
            m = SVD_TIME_RE.match(line)
            if m:
                out["svd_analysis_ms"].append(float(m.group(1)))
            m = RESUME_RE.match(line)
            if m:
                out["resumed_at"] = int(m.group(1))
    return out


def layer_records(records):
    """{layer: [records in step order]} of the analyses that reached a decision (skipped ones left out)."""
    layers = {}
    for r in records:
        if "mode_after" in r:
            layers.setdefault(r["layer"], []).append(r)
    return layers


def svd_summary(records):
    """The adaptive columns of the comparison table, computed from svd_metrics.jsonl records.

    lowrank_share: share of layer-analyses whose mode after the analysis is low-rank (protected);
    mean_r: mean r_after (the rank an update can have) over those; mean_k: mean learned directions
    over all layer-analyses. Protection changes no parameter count: every layer trains its full weight,
    confined to its minor subspace while protected.
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
        "last_step": max(r["step"] for r in decided),
    }


def full_sizes(records):
    """{layer: n_out * n_in} from any analysis record (used for a baseline, which has no JSONL of its own)."""
    return {r["layer"]: r["shape"][0] * r["shape"][1] for r in records if "shape" in r}


def run_settings(run_dir):
    """The run's train_config (every svd_* threshold included) and where it came from.

    config.json (written with every checkpoint) first; for a running job that has not saved yet, the
    command in command.txt (written by scripts.compare_runs) parsed with the training script's own flag
    definitions, so unspecified thresholds take the same defaults the run itself took.
    """
    cfg = read_config(run_dir)
    if cfg and "train_config" in cfg:
        return cfg["train_config"], os.path.join(run_dir, "config.json")
    cmd_path = os.path.join(run_dir, "command.txt")
    if os.path.exists(cmd_path):
        import dataclasses
        import shlex

        from nanochat.adaptive_cycle import AdaptiveConfig
        from nanochat.cli import parse_args
        argv = [a for a in shlex.split(open(cmd_path).read()) if a.startswith("--")]
        return dataclasses.asdict(parse_args(AdaptiveConfig, argv, prog="", description="")), cmd_path
    return None, None
