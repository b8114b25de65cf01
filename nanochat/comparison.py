"""Phase 2: baseline vs adaptive SVD over seeds, and its report, computed from the runs' kept files.

Per seed a baseline run (--adaptive_svd=false: the identical loop without the hook) and an adaptive run, with the
same --seed and --data_seed (each seed varies the init and the data order), tokens and hyperparameters. Each
finished run is kept (nanochat.runs.keep_run, under <out>/kept/<tag>/) and `tabulate` computes every number of
the report from the kept files alone, so scripts/rebuild_evidence.py rebuilds it byte for byte without run
folders or checkpoints. scripts/compare_runs.py is the command line.
"""

import os

from nanochat import stats
from nanochat.checkpoint_manager import checkpoint_dir
from nanochat.jobs import Job, training_argv
from nanochat.plots import make_figures
from nanochat.report import fmt, fmt_interval, fmt_pm, markdown_table, write_json_and_markdown
from nanochat.runs import finished, made_with, read_config, summarize

KINDS = ("baseline", "adaptive")
RESERVED = ("adaptive_svd", "model_tag", "output_dir", "seed", "data_seed", "overwrite", "resume")
DEFAULTS = {"dtype": "float32"}  # every run of the comparison in one matmul dtype (nanochat.jobs.check_pinned_dtype)
BPB_RATIO_TARGET = 1.005  # the research target: the upper bound of the bpb ratio's 95% interval at most this


def run_tag(kind, seed):
    return f"{kind}_s{seed}"


def run_argv(kind, seed, out, train_argv):
    own = {"adaptive_svd": "true" if kind == "adaptive" else "false", "model_tag": run_tag(kind, seed), "output_dir": out}
    return training_argv(own, train_argv) + [f"--seed={seed}", f"--data_seed={seed}"]


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


def run_summary(kept, tag):
    """A kept run's summary (nanochat.runs.summarize) under its tag, without the folder's path (the same report
    wherever the kept files lie)."""
    summary = summarize(os.path.join(kept, tag))
    return {"run": tag, **{k: v for k, v in summary.items() if k not in ("run_dir", "source")}}


def seed_result(kept, seed):
    """Both runs of a seed and their ratios adaptive / baseline (None where a value is missing)."""
    runs = {kind: run_summary(kept, run_tag(kind, seed)) for kind in KINDS}
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


def target(ratio):
    """The research target on the bpb ratio's t-interval: its upper bound at most BPB_RATIO_TARGET (None without one)."""
    if ratio is None or ratio["hi"] is None:
        return None
    return {"upper_bound": ratio["hi"], "met": ratio["hi"] <= BPB_RATIO_TARGET}


def summary(results):
    """Per SUMMARY line: mean, sd and the 95% t-interval of the mean over the seeds that have the value."""
    out = {}
    for label, get, _ in SUMMARY:
        values = [get(r) for r in results if get(r) is not None]
        out[label] = stats.t_interval(values) if values else None
    out["target"] = target(out["bpb ratio adaptive/baseline"])
    return out


def target_line(table):
    verdict = table["target"]
    ratio = table["bpb ratio adaptive/baseline"]
    rule = f"Research target (the upper bound of the bpb ratio's 95% interval at most {BPB_RATIO_TARGET})"
    if verdict is None:
        return f"{rule}: cannot be judged (needs the bpb ratio of at least two seeds)."
    return (f"{rule}: {'**met**' if verdict['met'] else '**not met**'}. Mean bpb ratio {fmt(ratio['mean'])}, 95% interval "
            f"{fmt_interval(ratio)}: upper bound {fmt(ratio['hi'])} {'<=' if verdict['met'] else '>'} {BPB_RATIO_TARGET}.")


def tabulate(seeds, train_argv, command, kept):
    """Everything the report says, from the kept runs in `kept`."""
    results = [seed_result(kept, seed) for seed in seeds]
    tags = [run_tag(kind, seed) for seed in seeds for kind in KINDS]
    return {"command": command, "train_argv": train_argv, "seeds": seeds,
            "run_commands": [open(os.path.join(kept, t, "command.txt")).read().strip() for t in tags],
            "provenance": made_with(os.path.join(kept, t) for t in tags),
            "dtypes": sorted({read_config(os.path.join(kept, t))["train_config"].get("dtype") for t in tags}),
            "results": results, "summary": summary(results)}


def markdown(data):
    results, table = data["results"], data["summary"]
    lines = [f"Command: `{data['command']}`", "", f"Seeds {', '.join(map(str, data['seeds']))}, each the init (--seed) and the "
             f"data order (--data_seed) of both its runs. Matmul dtype of the runs: {', '.join(map(str, data['dtypes']))}. "
             f"The runs were made with:", ""]
    lines += markdown_table(["git commit", "uncommitted changes", "torch", "python", "CPU", "threads per run", "GPUs",
                             "process starts"],
                            [[p["git_commit"] or "n/a", fmt(p["git_dirty"]), p["torch"], p["python"], p["cpu"], p["threads"],
                              ", ".join(p["gpus"]) or "none", p["starts"]] for p in data["provenance"]])
    lines += ["", "Runs (each in its own process, one thread; a fresh start adds --overwrite=true, a continued one "
                  "--resume=true):", ""]
    lines += [f"- `{c}`" for c in data["run_commands"]] + [""]
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
    lines += [""] + summary_lines(table, len(results))
    return "\n".join(lines) + "\n"


def summary_lines(table, n):
    """The over-seeds table (mean ± std and the 95% t-interval per quantity) and the research target's verdict."""
    lines = [f"Over {n} seed(s): mean ± std (sample) and the 95% t-interval of the mean:", ""]
    rows = [[label, fmt_pm(iv["mean"], iv["sd"], spec), fmt_interval(iv, spec)] if iv else [label, "n/a", "n/a"]
            for (label, _, spec), iv in ((s, table[s[0]]) for s in SUMMARY)]
    return lines + markdown_table(["quantity", "mean ± std", "95% interval"], rows) + ["", target_line(table)]


def rejudged_markdown(data):
    """A kept comparison.json of before the upper-bound criterion, re-judged by it (the table from its summary)."""
    table = {**data["summary"], "target": target(data["summary"]["bpb ratio adaptive/baseline"])}
    return "\n".join([f"The comparison `{data['command']}`, re-judged from its kept comparison.json by today's criterion "
                       f"(the upper bound of the bpb ratio's 95% interval).", ""]
                      + summary_lines(table, len(data["results"]))) + "\n"


def write_report(data, out):
    """comparison.json and comparison.md in `out`; returns the markdown text."""
    text = markdown(data)
    write_json_and_markdown(out, "comparison", data, text)
    return text


def write_figures(seeds, kept, out, prefix=""):
    """scripts.plot_svd's figures of each seed (adaptive run against its baseline), from the kept runs, to `out`."""
    written = []
    for seed in seeds:
        written += make_figures(os.path.join(kept, run_tag("adaptive", seed)), out,
                                baseline=os.path.join(kept, run_tag("baseline", seed)), prefix=f"{prefix}s{seed}_")
    return written
