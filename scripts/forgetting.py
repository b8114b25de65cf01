"""Forgetting experiment: train on domain A, continue on domain B, measure what A loses, over seeds.

    python -m scripts.forgetting --data_a=DIR_A --data_b=DIR_B --steps_a=1500 --steps_b=500 --out=/tmp/forget \\
        --jobs=2 -- --depth=4 --max_seq_len=256 --device_batch_size=1 --total_batch_size=256 \\
        --eval_tokens=32768 --device_type=cpu --svd_interval=25

Per seed (--seeds, default 42,43,44):
  phase A  plain training on A (--adaptive_svd=false), shared by every variant  -> <out>/base_checkpoints/A_s<S>/
  phase B  a new run on B from A's final checkpoint (--init_from: weights and optimizer state carried over;
           fresh step counter, so the LR is re-warmed; fresh data position and adaptive-SVD state), one per
           variant                                                              -> <out>/base_checkpoints/B_<variant>_s<S>/
Variants of phase B (every attention and MLP matrix of every block is analysed: --adaptive_svd_target_layer=-1
--svd_targets=all unless the training flags say otherwise):
  baseline       plain training; the analysis only observes (--svd_policy=observe: it trains exactly like
                 --adaptive_svd=false and logs what the detector reads)
  adaptive       the v2 default policy (--svd_policy=adaptive)
  static         every matrix protected from the first B step, k from A's final spectrum (--svd_policy=static, OSFT)
  replay         baseline + --replay_fraction (default 5%) of the sequences from A's train data
  static_replay  static protection + replay
Phase B evaluates B's val bpb (its own val shard) and A's (--extra_val_dir: A's val shard) every --measure_every
B-steps: the first point is before any B update (it equals phase A's final evaluation of A; the report
checks), the last after the final step.

Each run is `python -m scripts.base_train_adaptive_svd` in its own process with one thread; --jobs=2 runs
two at a time (phase B runs of a seed start once its phase A is done). A run whose files show it finished
with the same command is reused and one that was stopped continues with --resume, so an interrupted
experiment continues where it was; --force=true repeats them. --table_only=true only tabulates.

Writes <out>/forgetting.json (every measurement per variant and seed, the statistics, the exact commands),
<out>/forgetting.md (tables: mean ± std per variant, the paired difference to baseline with a 95%
t-interval, and whether the research target is met), and with --figures=true (default) forgetting.png,
pareto.png and detector.png (see scripts.plot_svd; they need the `plots` extra, matplotlib).
"""

import dataclasses
import json
import os

from nanochat import stats
from nanochat.adaptive_svd import Action
from nanochat.checkpoint_manager import CHECKPOINT_NAME, checkpoint_dir, load_checkpoint
from nanochat.cli import Check, at_least, between, flag, one_of, parse_args, passthrough, required
from nanochat.common import UserError, run_cli
from nanochat.dataset import list_shards
from nanochat.jobs import Job, check_reserved, command_line, parse_seeds, run_jobs, training_argv, with_defaults
from nanochat.plots import forgetting_figures, pyplot
from nanochat.report import fmt, fmt_interval, fmt_pm, markdown_table
from nanochat.runs import (LAYER_TYPES, evaluations, finished, layer_type, read_config, step_rows, summarize,
                           svd_records)

VARIANTS = {  # phase B: the analysis policy, and whether A's data is replayed
    "baseline": ("observe", False),
    "adaptive": ("adaptive", False),
    "static": ("static", False),
    "replay": ("observe", True),
    "static_replay": ("static", True),
}
PROTECTED = ("adaptive", "static", "static_replay")
RESERVED = ("data_dir", "num_iterations", "model_tag", "output_dir", "seed", "resume", "overwrite", "adaptive_svd",
            "svd_policy", "init_from", "replay_data_dir", "replay_fraction", "extra_val_dir", "eval_every")
DEFAULTS = {"adaptive_svd_target_layer": -1, "svd_targets": "all"}
FORGETTING_DROP_TARGET = 0.30  # a protected variant lowers forgetting by at least this share of baseline's ...
B_BPB_RISE_LIMIT = 0.01        # ... at no more than this relative rise of the final B bpb


def variant_names(text):
    return [v.strip() for v in text.split(",") if v.strip()]


VARIANT_LIST = Check(lambda v: all(n in VARIANTS for n in variant_names(v)) and len(set(variant_names(v))) == len(variant_names(v)),
                     f"a comma list of {', '.join(VARIANTS)}, each once")


@dataclasses.dataclass
class ForgettingConfig:
    data_a: str = required("domain A's data dir (train + val shards)")
    data_b: str = required("domain B's data dir")
    steps_a: int = required("optimizer steps of phase A", at_least(1))
    steps_b: int = required("optimizer steps of phase B", at_least(1))
    out: str = required("output dir (runs, forgetting.json, forgetting.md, figures)")
    seeds: str = flag("42,43,44", "comma list of seeds; one phase A and one phase B run per variant each")
    variants: str = flag(",".join(VARIANTS), "the variants to run (baseline is always run)", VARIANT_LIST)
    measure_every: int = flag(50, "measure A's and B's val bpb every N steps of phase B (and before and after it)", at_least(1))
    replay_fraction: float = flag(0.05, "share of phase-B sequences from A's train data in the replay variants",
                                  between(0, 1, open_lo=True, open_hi=True))
    eval_every_a: int = flag(250, "phase A evaluates A's val bpb every N steps (and at the end); -1 = only at the end",
                             at_least(1).or_(-1))
    jobs: int = flag(1, "runs at a time, each with one thread (at most two: the machine rule)", one_of(1, 2))
    force: bool = flag(False, "repeat runs that already finished (replacing their files)")
    table_only: bool = flag(False, "run nothing; tabulate the runs in --out")
    figures: bool = flag(True, "also write forgetting.png, pareto.png and detector.png to --out")
    train_flags: list[str] = passthrough("flags of scripts.base_train_adaptive_svd, shared by every run")


def a_tag(seed):
    return f"A_s{seed}"


def b_tag(variant, seed):
    return f"B_{variant}_s{seed}"


def b_finished(run_dir):
    return finished(run_dir, needs=("val_bpb", "extra_val_bpb"))


def plan(args, seeds, variants, train_argv):
    """Every run: phase A per seed, then phase B per seed and variant (each after its seed's phase A)."""
    out = args.out
    shared = with_defaults(train_argv, DEFAULTS)
    jobs = []
    for seed in seeds:
        own = {"adaptive_svd": "false", "data_dir": args.data_a, "num_iterations": args.steps_a,
               "eval_every": args.eval_every_a, "model_tag": a_tag(seed), "output_dir": out, "seed": seed}
        jobs.append(Job(a_tag(seed), checkpoint_dir(out, a_tag(seed)), training_argv(own, shared), finished))
    for seed in seeds:
        source = os.path.join(checkpoint_dir(out, a_tag(seed)), CHECKPOINT_NAME)
        for variant in variants:
            policy, replay = VARIANTS[variant]
            own = {"adaptive_svd": "true", "svd_policy": policy, "init_from": source, "data_dir": args.data_b,
                   "extra_val_dir": args.data_a, "num_iterations": args.steps_b, "eval_every": args.measure_every,
                   "model_tag": b_tag(variant, seed), "output_dir": out, "seed": seed}
            if replay:
                own.update(replay_data_dir=args.data_a, replay_fraction=args.replay_fraction)
            jobs.append(Job(b_tag(variant, seed), checkpoint_dir(out, b_tag(variant, seed)), training_argv(own, shared),
                            b_finished, after=(a_tag(seed),)))
    return jobs


def detector_series(records):
    """{layer type: [{step, alignment_ratio, update_alignment_ratio}]}: each analysis step's mean over the
    blocks (values that are None, e.g. before the first basis or with k = 0, are left out of the mean)."""
    by_type = {}
    for r in records:
        if "mode_after" not in r:
            continue
        point = by_type.setdefault(layer_type(r["layer"]), {}).setdefault(r["step"], {"alignment_ratio": [], "update_alignment_ratio": []})
        for key in point:
            if isinstance(r.get(key), (int, float)):
                point[key].append(r[key])
    return {t: [{"step": step, **{k: (sum(v) / len(v) if v else None) for k, v in point.items()}}
                for step, point in sorted(steps.items())] for t, steps in by_type.items()}


def phase_a_result(out, seed):
    run_dir = checkpoint_dir(out, a_tag(seed))
    summary = summarize(run_dir)
    return {"seed": seed, "run_dir": run_dir, "final_val_bpb": summary["final_val_bpb"],
            "curve": evaluations(step_rows(run_dir)), "steps": summary["steps"],
            "loop_s": summary["loop_s"], "median_step_s": summary["median_step_s"]}


def phase_b_result(out, variant, seed, a_final):
    """One phase B run from its files: the curves of A and B, forgetting, B learning, the detector's readings."""
    run_dir = checkpoint_dir(out, b_tag(variant, seed))
    rows = step_rows(run_dir)
    curve = [{"step": r["step"], "A_val_bpb": r["extra_val_bpb"], "B_val_bpb": r["val_bpb"]} for r in rows if "extra_val_bpb" in r]
    first, last = curve[0], curve[-1]
    records = svd_records(run_dir)
    summary = summarize(run_dir)
    loader = load_checkpoint(os.path.join(run_dir, CHECKPOINT_NAME))["loop"]["dataloader"][0]
    svd = summary["svd"] or {}
    return {
        "variant": variant, "seed": seed, "run_dir": run_dir, "curve": curve,
        "a_final_of_phase_a": a_final, "first_point_vs_phase_a": first["A_val_bpb"] - a_final,
        "a_bpb_before": first["A_val_bpb"], "a_bpb_after": last["A_val_bpb"], "forgetting": last["A_val_bpb"] - first["A_val_bpb"],
        "b_bpb_before": first["B_val_bpb"], "b_bpb_after": last["B_val_bpb"], "b_learning": first["B_val_bpb"] - last["B_val_bpb"],
        "replayed_share": loader["replayed"] / loader["sequences"] if "replayed" in loader else None,
        "lowrank_share": svd.get("lowrank_share"), "to_lowrank": svd.get("to_lowrank"), "to_full": svd.get("to_full"),
        "mean_k": svd.get("mean_k"), "reasons": sorted({r["reason"] for r in records if r.get("action") in (Action.TO_LOWRANK, Action.TO_FULL)}),
        "loop_s": summary["loop_s"], "median_step_s": summary["median_step_s"], "analysis_s": summary["analysis_s"],
        "detector": detector_series(records),
    }


def variant_stats(results, variants):
    """Per variant: mean ± std over seeds of forgetting, final B bpb and B learning; for the others, the paired
    per-seed differences to baseline with their 95% t-interval, the relative changes and the target verdict."""
    by = {v: {r["seed"]: r for r in results if r["variant"] == v} for v in variants}
    out = {}
    for v in variants:
        entry = {}
        for key in ("forgetting", "b_bpb_after", "b_learning"):
            mean, sd = stats.mean_std([r[key] for r in by[v].values()])
            entry[key] = {"mean": mean, "sd": sd, "n": len(by[v])}
        if v != "baseline":
            for key in ("forgetting", "b_bpb_after"):
                seeds, diffs = stats.paired({s: r[key] for s, r in by[v].items()}, {s: r[key] for s, r in by["baseline"].items()})
                base = stats.mean_std([by["baseline"][s][key] for s in seeds])[0]
                iv = stats.t_interval(diffs)
                # relative to baseline's mean; undefined when baseline shows no forgetting to lower
                entry[f"diff_{key}"] = {**iv, "seeds": seeds, "per_seed": diffs,
                                        "relative": iv["mean"] / base if base is not None and base > 0 else None}
            entry["target"] = target_verdict(entry)
        out[v] = entry
    return out


def target_verdict(entry):
    """The research target for one variant: forgetting lowered by >= 30% of baseline's, with the 95% interval of the
    paired difference entirely below zero, at a final B bpb at most 1% above baseline's."""
    f, b = entry["diff_forgetting"], entry["diff_b_bpb_after"]
    checks = {
        "forgetting_lowered_30pct": f["relative"] is not None and f["relative"] <= -FORGETTING_DROP_TARGET,
        "interval_excludes_zero": f["hi"] is not None and f["hi"] < 0,
        "b_bpb_within_1pct": b["relative"] is not None and b["relative"] <= B_BPB_RISE_LIMIT,
    }
    return {**checks, "met": all(checks.values())}


def markdown(data):
    s, res, st = data["settings"], data["results"], data["stats"]
    lines = [f"Command: `{data['command']}`", "",
             f"Phase A: {s['steps_a']} steps on {s['data_a']}; phase B: {s['steps_b']} steps on {s['data_b']} from A's final "
             f"checkpoint (LR re-warmed); A's and B's val bpb every {s['measure_every']} B-steps; seeds {s['seeds']}; "
             f"replay fraction {s['replay_fraction']}.", "", "Runs (each in its own process, one thread; a fresh start adds "
             "--overwrite=true, a continued one --resume=true):", ""]
    lines += [f"- `{c}`" for c in data["run_commands"]] + ["", "Phase A (A's val bpb at its end):", ""]
    lines += markdown_table(["seed", "steps", "final A val bpb", "summed step time (s)"],
                            [[a["seed"], fmt(a["steps"]), fmt(a["final_val_bpb"]), fmt(a["loop_s"], ".1f")] for a in data["phase_a"]])
    worst = max(abs(r["first_point_vs_phase_a"]) for r in res)
    lines += ["", f"First phase-B measurement of A (before any B update) vs phase A's final evaluation of A: largest "
                  f"difference {worst:.2e} over {len(res)} runs (same weights, same val shard and token budget).", "",
              "Every phase B run (forgetting = A's bpb after B minus before B; B learning = B's bpb before minus after):", ""]
    rows = [[r["variant"], r["seed"], fmt(r["a_bpb_before"]), fmt(r["a_bpb_after"]), f"{r['forgetting']:+.4f}",
             fmt(r["b_bpb_before"]), fmt(r["b_bpb_after"]), f"{r['b_learning']:+.4f}", fmt(r["replayed_share"], ".3f"),
             fmt(r["lowrank_share"], ".3f"), f"{fmt(r['to_lowrank'])} / {fmt(r['to_full'])}", fmt(r["mean_k"], ".1f"),
             fmt(r["analysis_s"], ".1f")] for r in res]
    lines += markdown_table(["variant", "seed", "A bpb before B", "A bpb after B", "forgetting", "B bpb before B",
                             "B bpb after B", "B learning", "replayed share", "protected share", "to protected / to full",
                             "mean k", "analysis (s)"], rows)
    lines += ["", "Per variant, mean ± std over seeds (sample std); paired per-seed difference to baseline with its 95% "
                  "t-interval (mean ± t(0.975, n-1) sd/sqrt(n)); relative = mean difference / baseline's mean:", ""]
    rows = []
    for v, e in st.items():
        row = [v] + [fmt_pm(e[key]["mean"], e[key]["sd"]) for key in ("forgetting", "b_bpb_after", "b_learning")]
        if v == "baseline":
            row += ["-"] * 5
        else:
            f, b = e["diff_forgetting"], e["diff_b_bpb_after"]
            row += [f"{f['mean']:+.4f} {fmt_interval(f)}", fmt(f["relative"], "+.1%"), f"{b['mean']:+.4f} {fmt_interval(b)}",
                    fmt(b["relative"], "+.2%"), "**yes**" if e["target"]["met"] else "no"]
        rows.append(row)
    lines += markdown_table(["variant", "forgetting", "final B bpb", "B learning", "forgetting - baseline [95% CI]", "relative",
                             "final B bpb - baseline [95% CI]", "relative", "target met"], rows)
    lines += ["", f"Research target: a protected variant lowers forgetting by at least {FORGETTING_DROP_TARGET:.0%} against "
                  f"baseline, with the 95% interval of the paired difference excluding zero, at a final B bpb at most "
                  f"{B_BPB_RISE_LIMIT:.0%} above baseline's.", ""]
    for v in (v for v in st if v != "baseline"):
        e, t = st[v], st[v]["target"]
        f, b = e["diff_forgetting"], e["diff_b_bpb_after"]
        kind = "protected" if v in PROTECTED else "not protected, a reference point"
        lines.append(f"- {v} ({kind}): forgetting {fmt(f['relative'], '+.1%')} vs baseline "
                     f"({'meets' if t['forgetting_lowered_30pct'] else 'misses'} -{FORGETTING_DROP_TARGET:.0%}); interval "
                     f"{fmt_interval(f)} {'excludes' if t['interval_excludes_zero'] else 'does not exclude'} zero; final B bpb "
                     f"{fmt(b['relative'], '+.2%')} ({'within' if t['b_bpb_within_1pct'] else 'beyond'} "
                     f"+{B_BPB_RISE_LIMIT:.0%}): target {'**met**' if t['met'] else '**not met**'}.")
    met = [v for v in PROTECTED if v in st and st[v]["target"]["met"]]
    lines += ["", f"Verdict: {'met by ' + ', '.join(met) if met else 'no protected variant meets the target'}."]
    n = min(e["forgetting"]["n"] for e in st.values())
    if n < 2:
        lines.append("(With fewer than two seeds there is no interval, so no variant can meet the target.)")
    if not st["baseline"]["forgetting"]["mean"] > 0:
        lines.append("(Baseline's A bpb did not rise during B: there is no forgetting to lower, so no variant can meet "
                     "the target.)")
    lines += ["", "Detector during B: mean over the B analyses of the gradient and update alignment ratio per layer type "
                  "(mean over blocks and seeds; random = 1; the entry test reads the gradient's p-value, svd_alpha "
                  f"{fmt(data['thresholds'].get('svd_alpha'), 'g')}):", ""]
    types = list(LAYER_TYPES)
    rows = []
    for v in st:
        cells = []
        for t in types:
            pts = [p for r in res if r["variant"] == v for p in r["detector"].get(t, [])]
            g = [p["alignment_ratio"] for p in pts if p["alignment_ratio"] is not None]
            u = [p["update_alignment_ratio"] for p in pts if p["update_alignment_ratio"] is not None]
            cells.append(f"{fmt(sum(g) / len(g) if g else None, '.2f')} / {fmt(sum(u) / len(u) if u else None, '.2f')}")
        rows.append([v] + cells)
    lines += markdown_table(["variant"] + [f"{LAYER_TYPES[t]} grad / update" for t in types], rows)
    return "\n".join(lines) + "\n"


def parse_own(argv):
    args = parse_args(ForgettingConfig, argv, prog="python -m scripts.forgetting", description=__doc__)
    seeds = parse_seeds(args.seeds)
    variants = ["baseline"] + [v for v in variant_names(args.variants) if v != "baseline"]  # every comparison is against it
    check_reserved(args.train_flags, RESERVED, "the forgetting experiment")
    for d in (args.data_a, args.data_b):
        list_shards(d, "train"), list_shards(d, "val")
    if os.path.realpath(args.data_a) == os.path.realpath(args.data_b):
        raise UserError("--data_a and --data_b are the same directory; give two domains")
    from nanochat.adaptive_cycle import AdaptiveConfig
    train_argv = with_defaults(args.train_flags, DEFAULTS)
    # every training flag is checked now, not after phase A
    cfg = parse_args(AdaptiveConfig, train_argv, prog="python -m scripts.forgetting -- [training flags]", description="")
    if args.figures:
        pyplot()  # so does a missing matplotlib
    args.out = os.path.abspath(args.out)
    args.data_a, args.data_b = os.path.abspath(args.data_a), os.path.abspath(args.data_b)
    return args, seeds, variants, cfg


def main(argv):
    args, seeds, variants, cfg = parse_own(argv)
    os.makedirs(args.out, exist_ok=True)
    jobs = plan(args, seeds, variants, args.train_flags)
    if not args.table_only:
        run_jobs(jobs, args.jobs, force=args.force)
    missing = [job.tag for job in jobs if not job.complete(job.run_dir)]
    if missing:
        raise UserError(f"no finished run for {', '.join(missing)} in {args.out}; run without --table_only first")
    phase_a = [phase_a_result(args.out, seed) for seed in seeds]
    a_final = {a["seed"]: a["final_val_bpb"] for a in phase_a}
    results = [phase_b_result(args.out, v, seed, a_final[seed]) for v in variants for seed in seeds]
    b_config = read_config(checkpoint_dir(args.out, b_tag(variants[0], seeds[0])))["train_config"]
    data = {"command": "python -m scripts.forgetting " + " ".join(argv),
            "settings": {k: getattr(args, k) for k in ("data_a", "data_b", "steps_a", "steps_b", "measure_every",
                                                      "replay_fraction", "eval_every_a")} | {"seeds": seeds, "variants": variants},
            "train_argv": args.train_flags, "run_commands": [command_line(job.argv) for job in jobs],
            "thresholds": {k: b_config.get(k) for k in ("svd_policy", "svd_alpha", "svd_exit_p", "svd_interval")},
            "phase_a": phase_a, "results": results, "stats": variant_stats(results, variants)}
    with open(os.path.join(args.out, "forgetting.json"), "w") as f:
        json.dump(data, f, indent=1)
    text = markdown(data)
    with open(os.path.join(args.out, "forgetting.md"), "w") as f:
        f.write(text)
    print(text)
    if args.figures:
        print("\n".join(forgetting_figures(data, args.out)))


if __name__ == "__main__":
    run_cli(main)
