"""Phase 2: baseline vs adaptive SVD over seeds, with the same data order, tokens and hyperparameters.

    python -m scripts.compare_runs --out=/tmp/p2 --seeds=42,43,44 --jobs=2 -- --depth=4 --max_seq_len=256 \\
        --device_batch_size=1 --total_batch_size=256 --num_iterations=2000 --device_type=cpu \\
        --adaptive_svd_target_layer=-1 --svd_targets=attn --svd_interval=50

Per seed two runs of `python -m scripts.base_train_adaptive_svd <flags> --seed=S`, each in its own process
with one thread: the baseline adds --adaptive_svd=false (the identical loop without the hook). They go to
<out>/base_checkpoints/{baseline,adaptive}_s<S>/ with their console (train.log) and command (command.txt).
--jobs=2 runs a seed's baseline and adaptive run at the same time (both see the same contention; the
next seed starts when both are done). A run whose files show it finished with the same command is
reused, one that was stopped continues with --resume (so an interrupted comparison continues);
--force=true repeats them. --table_only=true only tabulates what exists.

Everything is read from the runs' files (train_metrics.jsonl, svd_metrics.jsonl, config.json). Writes
<out>/comparison.json and <out>/comparison.md: per run, per seed and as mean ± std over seeds, the final
val bpb, the bpb ratio adaptive/baseline with a 95% t-interval over seeds, the time ratios (median step,
summed step time, and steps x median + analysis time, which is robust to pauses of a shared machine),
switch counts, the share of layer-analyses in protected mode and the mean number of learned
directions k; and whether the research target (bpb ratio <= 1.005 with its interval including 1) is met.
With --figures=true (default) the figures of scripts.plot_svd for every seed go to <out>/figures/ (they
need the `plots` extra, matplotlib).
"""

import dataclasses
import json
import os

from nanochat import stats
from nanochat.checkpoint_manager import checkpoint_dir
from nanochat.cli import flag, one_of, parse_args, passthrough, required
from nanochat.common import UserError, run_cli
from nanochat.jobs import Job, check_reserved, command_line, parse_seeds, run_jobs, training_argv
from nanochat.plots import make_figures, pyplot
from nanochat.report import fmt, fmt_interval, fmt_pm, markdown_table
from nanochat.runs import finished, summarize

KINDS = ("baseline", "adaptive")
RESERVED = ("adaptive_svd", "model_tag", "output_dir", "seed", "overwrite", "resume")
BPB_RATIO_TARGET = 1.005


@dataclasses.dataclass
class CompareConfig:
    out: str = required("output dir: runs, comparison.json, comparison.md, figures/")
    seeds: str = flag("42,43,44", "comma list of seeds; one baseline + one adaptive run each")
    jobs: int = flag(1, "runs at a time, each with one thread: 2 runs a seed's baseline and adaptive run together",
                     one_of(1, 2))
    force: bool = flag(False, "repeat runs that already finished (replacing their files)")
    table_only: bool = flag(False, "run nothing; tabulate the runs in --out")
    figures: bool = flag(True, "also write scripts.plot_svd's figures of every seed to <out>/figures")
    train_flags: list[str] = passthrough("flags of scripts.base_train_adaptive_svd, shared by every run")


def run_tag(kind, seed):
    return f"{kind}_s{seed}"


def run_argv(kind, seed, out, train_argv):
    own = {"adaptive_svd": "true" if kind == "adaptive" else "false", "model_tag": run_tag(kind, seed), "output_dir": out}
    return training_argv(own, train_argv) + [f"--seed={seed}"]


def jobs_for(seeds, out, train_argv, slots):
    """A baseline and an adaptive job per seed; with two slots each seed's pair waits for the previous pair,
    so the two runs of a seed always run side by side."""
    jobs, previous = [], ()
    for seed in seeds:
        pair = [Job(run_tag(kind, seed), checkpoint_dir(out, run_tag(kind, seed)), run_argv(kind, seed, out, train_argv),
                    finished, after=previous if slots > 1 else ()) for kind in KINDS]
        jobs += pair
        previous = tuple(job.tag for job in pair)
    return jobs


def seed_result(out, seed):
    """Both runs of a seed and their ratios adaptive / baseline (None where a run is missing)."""
    runs = {kind: summarize(checkpoint_dir(out, run_tag(kind, seed))) for kind in KINDS}
    b, a = runs["baseline"], runs["adaptive"]

    def ratio(key):
        return a[key] / b[key] if a[key] is not None and b[key] else None

    svd = a["svd"] or {}
    return {"seed": seed, "runs": runs, "equal_tokens": a["tokens"] == b["tokens"],
            "bpb_ratio": ratio("final_val_bpb"), "median_step_ratio": ratio("median_step_s"), "loop_time_ratio": ratio("loop_s"),
            "time_estimate_ratio": ratio("time_estimate_s"), "analysis_s": a["analysis_s"],
            "to_lowrank": svd.get("to_lowrank"), "to_full": svd.get("to_full"), "lowrank_share": svd.get("lowrank_share"),
            "mean_k": svd.get("mean_k")}


SUMMARY = [("baseline final val bpb", lambda r: r["runs"]["baseline"]["final_val_bpb"], ".4f"),
           ("adaptive final val bpb", lambda r: r["runs"]["adaptive"]["final_val_bpb"], ".4f"),
           ("bpb ratio adaptive/baseline", lambda r: r["bpb_ratio"], ".4f"),
           ("median step ratio", lambda r: r["median_step_ratio"], ".3f"),
           ("summed step time ratio", lambda r: r["loop_time_ratio"], ".3f"),
           ("time estimate ratio (steps x median + analysis)", lambda r: r["time_estimate_ratio"], ".3f"),
           ("analysis time (s)", lambda r: r["analysis_s"], ".1f"),
           ("switches to protected", lambda r: r["to_lowrank"], ".1f"),
           ("switches to full", lambda r: r["to_full"], ".1f"),
           ("protected share of layer-analyses", lambda r: r["lowrank_share"], ".3f"),
           ("mean learned directions k", lambda r: r["mean_k"], ".1f")]


def summary(results):
    """Per SUMMARY line: mean, sd and the 95% t-interval of the mean over the seeds that have the value."""
    out = {}
    for label, get, _ in SUMMARY:
        values = [get(r) for r in results if get(r) is not None]
        out[label] = stats.t_interval(values) if values else None
    ratio = out["bpb ratio adaptive/baseline"]
    out["target"] = None if ratio is None or ratio["lo"] is None else {
        "mean_at_most": ratio["mean"] <= BPB_RATIO_TARGET, "interval_includes_1": ratio["lo"] <= 1 <= ratio["hi"],
        "met": ratio["mean"] <= BPB_RATIO_TARGET and ratio["lo"] <= 1 <= ratio["hi"]}
    return out


def markdown(results, table, command, commands):
    lines = [f"Command: `{command}`", "", "Runs (each in its own process, one thread):", ""]
    lines += [f"- `{c}`" for c in commands] + [""]
    header = ["run", "steps", "tokens", "final val bpb", "min val bpb", "summed step time (s)", "median step (ms)",
              "analysis (s)", "steps > 5x median", "steps x median + analysis (s)", "protected share", "to protected / to full",
              "mean k"]
    rows = []
    for r in results:
        for kind in KINDS:
            run, svd = r["runs"][kind], r["runs"][kind]["svd"] or {}
            rows.append([run_tag(kind, r["seed"]), fmt(run["steps"]), fmt(run["tokens"]), fmt(run["final_val_bpb"]),
                         fmt(run["min_val_bpb"]), fmt(run["loop_s"], ".1f"),
                         fmt(None if run["median_step_s"] is None else 1000 * run["median_step_s"], ".1f"),
                         fmt(run["analysis_s"], ".1f"), fmt(run["paused_steps"]), fmt(run["time_estimate_s"], ".1f"),
                         fmt(svd.get("lowrank_share", 0.0 if kind == "baseline" else None), ".3f"),
                         f"{fmt(svd.get('to_lowrank', 0 if kind == 'baseline' else None))} / "
                         f"{fmt(svd.get('to_full', 0 if kind == 'baseline' else None))}", fmt(svd.get("mean_k"), ".1f")])
    lines += markdown_table(header, rows) + ["", "Per seed, adaptive / baseline:", ""]
    rows = [[r["seed"], fmt(r["equal_tokens"]), fmt(r["bpb_ratio"]), fmt(r["median_step_ratio"], ".3f"),
             fmt(r["loop_time_ratio"], ".3f"), fmt(r["time_estimate_ratio"], ".3f")] for r in results]
    lines += markdown_table(["seed", "equal tokens", "bpb ratio", "median step ratio", "summed step time ratio",
                             "time estimate ratio"], rows)
    lines += ["", f"Over {len(results)} seed(s): mean ± std (sample) and the 95% t-interval of the mean:", ""]
    rows = [[label, fmt_pm(iv["mean"], iv["sd"], spec), fmt_interval(iv, spec)] if iv else [label, "n/a", "n/a"]
            for (label, _, spec), iv in ((s, table[s[0]]) for s in SUMMARY)]
    lines += markdown_table(["quantity", "mean ± std", "95% interval"], rows) + [""]
    target = table["target"]
    ratio = table["bpb ratio adaptive/baseline"]
    if target is None:
        lines.append(f"Research target (bpb ratio <= {BPB_RATIO_TARGET} with the 95% interval including 1): cannot be "
                     f"judged (needs the bpb ratio of at least two seeds).")
    else:
        verdict = "**met**" if target["met"] else "**not met**"
        lines.append(f"Research target (bpb ratio <= {BPB_RATIO_TARGET} with the 95% interval including 1): {verdict}. "
                     f"Mean bpb ratio {fmt(ratio['mean'])} ({'<=' if target['mean_at_most'] else '>'} {BPB_RATIO_TARGET}); "
                     f"95% interval {fmt_interval(ratio)} ({'includes' if target['interval_includes_1'] else 'excludes'} 1).")
    return "\n".join(lines) + "\n"


def main(argv):
    args = parse_args(CompareConfig, argv, prog="python -m scripts.compare_runs", description=__doc__)
    seeds = parse_seeds(args.seeds)
    train_argv = args.train_flags
    check_reserved(train_argv, RESERVED, "the comparison runner")
    from nanochat.adaptive_cycle import AdaptiveConfig
    # every training flag is checked here, not in the middle of the runs
    parse_args(AdaptiveConfig, train_argv, prog="python -m scripts.compare_runs -- [training flags]", description="")
    if args.figures:
        pyplot()  # so does a missing matplotlib, not after the runs
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    jobs = jobs_for(seeds, out, train_argv, args.jobs)
    if not args.table_only:
        run_jobs(jobs, args.jobs, force=args.force)
    missing = [job.tag for job in jobs if not finished(job.run_dir)]
    if missing:
        raise UserError(f"no finished run for {', '.join(missing)} in {out}; run without --table_only first")
    results = [seed_result(out, seed) for seed in seeds]
    table = summary(results)
    command = "python -m scripts.compare_runs " + " ".join(argv)
    commands = [command_line(job.argv) for job in jobs]
    with open(os.path.join(out, "comparison.json"), "w") as f:
        json.dump({"command": command, "train_argv": train_argv, "run_commands": commands, "seeds": seeds,
                   "results": results, "summary": table}, f, indent=1)
    text = markdown(results, table, command, commands)
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write(text)
    print(text)
    if args.figures:
        for seed in seeds:
            written = make_figures(checkpoint_dir(out, run_tag("adaptive", seed)), os.path.join(out, "figures"),
                                   baseline=checkpoint_dir(out, run_tag("baseline", seed)), prefix=f"s{seed}_")
            print("\n".join(written))


if __name__ == "__main__":
    run_cli(main)
