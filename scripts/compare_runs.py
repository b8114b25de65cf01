"""Baseline vs adaptive SVD: run both with the same seed, data order, tokens and hyperparameters, then tabulate.

    python -m scripts.compare_runs --out=/tmp/p2 [--seeds=42,43] -- --depth=4 --max_seq_len=256 \\
        --device_batch_size=1 --total_batch_size=256 --num_iterations=2000 --device_type=cpu \\
        --adaptive_svd_target_layer=-1 --svd_targets=attn --svd_interval=50

Both runs are `python -m scripts.base_train_adaptive_svd <flags> --seed=S` in their own process (so wall
time and peak memory are each run's own), one after the other; the baseline adds --adaptive_svd=false,
which runs the identical loop without the hook. Runs go to <out>/base_checkpoints/{baseline,adaptive}_s<S>/
with their console log (train.log) and command (command.txt). A run that already finished there is
reused, not repeated (--force repeats it, replacing its files). `--table_only` only tabulates what exists.

Writes <out>/comparison.json and <out>/comparison.md. Columns: final and minimum val bpb (from the
log), tokens (config.json), loop training time (the log's "Total training time", evaluation excluded)
and process wall time, peak memory, and from svd_metrics.jsonl: share of layer-analyses in low-rank
mode, switches each way, mean r in low-rank mode, trainable parameters and Muon optimizer-state bytes
of the analysed layers (for the baseline: the same layers at full size). On a shared machine the loop
time picks up pauses; "time estimate" = steps x median step + the logged SVD analysis time is robust to them.
"""

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

from nanochat.checkpoint_manager import checkpoint_dir
from nanochat.cli import flag, parse_args, passthrough, required
from nanochat.common import UserError, run_cli
from scripts.run_logs import find_log, full_sizes, parse_log, read_config, read_jsonl, svd_summary

KINDS = ("baseline", "adaptive")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class CompareConfig:
    out: str = required("output dir: runs, comparison.json, comparison.md")
    seeds: str = flag("42", "comma list of seeds; one baseline + one adaptive run each")
    force: bool = flag(False, "repeat runs that already finished")
    table_only: bool = flag(False, "run nothing; tabulate the runs in --out")
    train_flags: list[str] = passthrough("flags of scripts.base_train_adaptive_svd, shared by every run")


def run_tag(kind, seed):
    return f"{kind}_s{seed}"


def run_command(kind, seed, out, train_argv):
    return [sys.executable, "-m", "scripts.base_train_adaptive_svd", f"--adaptive_svd={'true' if kind == 'adaptive' else 'false'}",
            f"--model_tag={run_tag(kind, seed)}", f"--output_dir={out}", *train_argv, f"--seed={seed}", "--overwrite=true"]


def finished(run_dir):
    cfg = read_config(run_dir)
    log = parse_log(find_log(run_dir))
    return cfg is not None and cfg.get("step") == cfg.get("num_iterations") and log["min_val_bpb"] is not None


def launch(kind, seed, out, train_argv):
    run_dir = checkpoint_dir(out, run_tag(kind, seed))
    os.makedirs(run_dir, exist_ok=True)
    cmd = run_command(kind, seed, out, train_argv)
    with open(os.path.join(run_dir, "command.txt"), "w") as f:
        f.write(" ".join(["python"] + cmd[1:]) + "\n")
    print(f"running {run_tag(kind, seed)}: {' '.join(['python'] + cmd[1:])}", flush=True)
    t0 = time.time()
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.time() - t0
    with open(os.path.join(run_dir, "wall_time.json"), "w") as f:
        json.dump({"wall_s": wall, "rc": rc}, f)
    if rc != 0:
        raise UserError(f"{run_tag(kind, seed)} failed with exit status {rc}; see {os.path.join(run_dir, 'train.log')}")
    return wall


def summarize(run_dir, kind, seed, reference_records=None):
    """One table row from a run folder's files."""
    cfg = read_config(run_dir) or {}
    tc = cfg.get("train_config", {})
    log = parse_log(find_log(run_dir))
    wall_path = os.path.join(run_dir, "wall_time.json")
    wall = json.load(open(wall_path))["wall_s"] if os.path.exists(wall_path) else None
    records = read_jsonl(os.path.join(run_dir, "svd_metrics.jsonl"))
    row = {"run": run_tag(kind, seed), "kind": kind, "seed": seed, "run_dir": run_dir,
           "steps": cfg.get("step"), "tokens": (cfg.get("step") or 0) * tc.get("total_batch_size", 0) or None,
           "final_val_bpb": log["val_bpb"][-1] if log["val_bpb"] else None, "min_val_bpb": log["min_val_bpb"],
           "train_time_s": None if log["train_time_min"] is None else 60 * log["train_time_min"],
           "mean_step_ms": sum(log["dt_ms"]) / len(log["dt_ms"]) if log["dt_ms"] else None,
           "median_step_ms": statistics.median(log["dt_ms"]) if log["dt_ms"] else None,
           "svd_analysis_s": sum(log["svd_analysis_ms"]) / 1000 if kind == "adaptive" else 0.0,
           "paused_steps": paused_steps(log["dt_ms"]),
           "time_estimate_s": time_estimate(log, kind),
           "wall_s": wall, "peak_memory_mib": log["peak_memory_mib"]}
    summary = svd_summary(records) if kind == "adaptive" else None
    if summary:
        row.update(summary)
    elif reference_records:
        full = sum(full_sizes(reference_records).values())
        row.update(layers=len(full_sizes(reference_records)), lowrank_share=0.0, to_lowrank=0, to_full=0, mean_r=None,
                   mean_k=None, full_params=full)
    return row


def paused_steps(dt_ms):
    """Steps that took over 5x the median: the process was paused or starved (a shared machine)."""
    if not dt_ms:
        return None
    med = statistics.median(dt_ms)
    return sum(d > 5 * med for d in dt_ms)


def time_estimate(log, kind):
    """Contention-robust training time: steps x median step + the logged SVD analysis time (adaptive).

    The median leaves out steps stretched by other processes (and the adaptive run's analysis steps,
    whose own cost is added back from the "=== SVD Analysis complete === (N ms)" lines)."""
    if not log["dt_ms"]:
        return None
    svd = sum(log["svd_analysis_ms"]) / 1000 if kind == "adaptive" else 0.0
    return len(log["dt_ms"]) * statistics.median(log["dt_ms"]) / 1000 + svd


COLUMNS = [("run", "run", None), ("tokens", "tokens", "{:,}"), ("final_val_bpb", "final val bpb", "{:.4f}"),
           ("min_val_bpb", "min val bpb", "{:.4f}"), ("train_time_s", "train time (s)", "{:.1f}"),
           ("mean_step_ms", "mean step (ms)", "{:.1f}"), ("median_step_ms", "median step (ms)", "{:.1f}"),
           ("svd_analysis_s", "SVD analysis time (s)", "{:.1f}"), ("paused_steps", "steps > 5x median", "{}"),
           ("time_estimate_s", "time estimate: steps x median + SVD (s)", "{:.1f}"), ("wall_s", "process wall (s)", "{:.1f}"),
           ("peak_memory_mib", "peak memory (MiB)", "{:.1f}"), ("lowrank_share", "low-rank share of layer-analyses", "{:.3f}"),
           ("to_lowrank", "switches to low-rank", "{}"), ("to_full", "switches to full", "{}"), ("mean_r", "mean r (low-rank)", "{:.1f}"),
           ("mean_k", "mean learned directions k", "{:.1f}")]


def cell(row, key, fmt):
    v = row.get(key)
    if v is None:
        return "n/a"
    return fmt.format(v) if fmt else str(v)


def ratios(rows):
    """adaptive / baseline per seed: train time, wall time, final and minimum val bpb (at equal tokens)."""
    out = []
    for seed in sorted({r["seed"] for r in rows}):
        pair = {r["kind"]: r for r in rows if r["seed"] == seed}
        if set(pair) != set(KINDS):
            continue
        b, a = pair["baseline"], pair["adaptive"]
        ratio = {"seed": seed, "equal_tokens": a["tokens"] == b["tokens"]}
        for key in ("train_time_s", "time_estimate_s", "median_step_ms", "wall_s", "final_val_bpb", "min_val_bpb", "peak_memory_mib"):
            ratio[key] = a[key] / b[key] if a.get(key) and b.get(key) else None
        out.append(ratio)
    return out


def markdown(rows, rat, command):
    lines = [f"Command: `{command}`", "", "| " + " | ".join(c[1] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r, k, f) for k, _, f in COLUMNS) + " |" for r in rows]
    lines += ["", "| seed | equal tokens | train time ratio | time estimate ratio | median step ratio | wall ratio | final bpb ratio | min bpb ratio | peak memory ratio |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rat:
        lines.append(f"| {r['seed']} | {r['equal_tokens']} | " + " | ".join(
            "n/a" if r[k] is None else f"{r[k]:.4f}" for k in ("train_time_s", "time_estimate_s", "median_step_ms", "wall_s", "final_val_bpb", "min_val_bpb", "peak_memory_mib")) + " |")
    return "\n".join(lines) + "\n"


def parse(argv):
    args = parse_args(CompareConfig, argv, prog="python -m scripts.compare_runs", description=__doc__)
    train_argv = args.train_flags
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--seeds must be a comma list of integers, got {args.seeds!r}") from None
    if not seeds:
        raise UserError("--seeds is empty")
    for key in ("seed", "model_tag", "output_dir", "adaptive_svd", "resume", "overwrite"):
        if any(a.lstrip("-").replace("-", "_").split("=")[0] == key for a in train_argv):
            raise UserError(f"--{key} is set by the comparison runner itself; leave it out of the training flags")
    return args, seeds, train_argv


def main(argv):
    args, seeds, train_argv = parse(argv)
    out = os.path.abspath(args.out)
    command = "python -m scripts.compare_runs " + " ".join(argv)
    if not args.table_only:
        for seed in seeds:
            for kind in KINDS:
                run_dir = checkpoint_dir(out, run_tag(kind, seed))
                if finished(run_dir) and not args.force:
                    print(f"{run_tag(kind, seed)}: finished run found in {run_dir}, reused", flush=True)
                    continue
                launch(kind, seed, out, train_argv)
    rows = []
    for seed in seeds:
        ref = read_jsonl(os.path.join(checkpoint_dir(out, run_tag("adaptive", seed)), "svd_metrics.jsonl"))
        for kind in KINDS:
            run_dir = checkpoint_dir(out, run_tag(kind, seed))
            if os.path.isdir(run_dir):
                rows.append(summarize(run_dir, kind, seed, ref))
    if not rows:
        raise UserError(f"no runs in {out}/base_checkpoints; run without --table_only first")
    rat = ratios(rows)
    with open(os.path.join(out, "comparison.json"), "w") as f:
        json.dump({"command": command, "train_argv": train_argv, "rows": rows, "ratios": rat}, f, indent=1)
    table = markdown(rows, rat, command)
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    run_cli(main)
