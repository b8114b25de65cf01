"""The forgetting experiment: its arms, its runs, and its report, computed from the runs' kept files.

Phase A trains on domain A once per seed; phase B continues A's final checkpoint (--init_from: weights and
optimizer state, a fresh step counter and LR schedule) on domain B, one run per arm and seed, measuring A's
and B's val bpb every --measure_every B-steps. Every seed varies the init (--seed) and the data order
(--data_seed) of both phases. What each arm runs is one declared table, ARMS. Each finished run is kept
(nanochat.runs.keep_run: its config, command, provenance, data position and gzipped metrics files, under
<out>/kept/<tag>/), and `tabulate` computes every number of the report from the kept files alone, so the
report is rebuilt byte for byte without run folders or checkpoints (scripts/rebuild_evidence.py).
scripts/forgetting.py is the command line.
"""

import dataclasses
import os

from nanochat import stats
from nanochat.adaptive_svd import Action
from nanochat.checkpoint_manager import CHECKPOINT_NAME, checkpoint_dir
from nanochat.cli import Check, at_least, between, flag, one_of, passthrough, required
from nanochat.jobs import Job, training_argv
from nanochat.plots import forgetting_figures
from nanochat.report import fmt, fmt_interval, fmt_pm, markdown_table, write_json_and_markdown
from nanochat.runs import (LAYER_TYPES, data_position, evaluations, finished, layer_type, made_with, provenance,
                           read_config, step_rows, summarize, svd_records)

FORGETTING_DROP_TARGET = 0.30  # a protection arm lowers forgetting by at least this share of baseline's ...
B_BPB_RISE_LIMIT = 0.01        # ... while the upper bound of its final B bpb's rise stays within this share
V2_RATIO_ENTER = 2.0           # v2's entry threshold on the alignment ratio (random = 1), kept as a detector
DEFAULTS = {"adaptive_svd_target_layer": -1, "svd_targets": "all", "dtype": "float32"}
DOSES = (0.1, 0.25, 0.5, 0.75)


@dataclasses.dataclass(frozen=True)
class Arm:
    """One arm of phase B. `flags`: its training flags beyond the shared ones. `protected`: a protection variant
    (judged by the research target; a candidate for --best). `replay`: the share of A's train sequences mixed in.
    `rewarm`: B's LR warms up linearly over --rewarm_ratio of the steps. `uses_best`: built on the arm --best names
    (the second stage). `control`: A -> more A (A's data from where phase A stopped reading) instead of A -> B.
    `derived`: not run, because its result follows from the baseline's by construction."""
    group: str
    what: str
    flags: dict = dataclasses.field(default_factory=dict)
    protected: bool = False
    replay: float = 0.0
    rewarm: bool = False
    uses_best: bool = False
    control: bool = False
    derived: bool = False


OBSERVE = {"svd_policy": "observe"}
ARMS = {
    "baseline": Arm("reference", "plain training on B; the analysis only observes (trains exactly as without it)", OBSERVE),
    "freeze_embed": Arm("localisation", "the token embedding and lm_head frozen during B", {**OBSERVE, "freeze": "embedding,lm_head"}),
    "freeze_blocks": Arm("localisation", "every block matrix frozen during B (the bound of any protection of them)",
                         {**OBSERVE, "freeze": "blocks"}),
    "freeze_all": Arm("localisation", "both frozen: every parameter of this model, so nothing trains (forgetting 0 and "
                                      "B learning 0 by construction; not run)", derived=True),
    **{f"static_f{round(100 * f)}": Arm("dose_blocks", f"static protection (OSFT) of the top {f:.0%} of g directions of "
                                                       f"every block matrix, from A's final spectrum",
                                        {"svd_policy": "static", "svd_protect_frac": f}, protected=True) for f in DOSES},
    **{f"embed_f{round(100 * f)}": Arm("dose_embed", f"static protection of the top {f:.0%} of g directions of the "
                                                     f"embedding and lm_head (AdamW's change confined)",
                                       {**OBSERVE, "svd_embed_frac": f}, protected=True) for f in DOSES},
    "adaptive": Arm("detector", "the default policy (the null-calibrated entry test)", {"svd_policy": "adaptive"}, protected=True),
    "shift": Arm("detector", "the shift policy (alignment against the layer's own running normal)", {"svd_policy": "shift"},
                 protected=True),
    "control": Arm("control", "no domain shift: more A (from where phase A stopped reading), same step counts", OBSERVE,
                   control=True),
    "baseline_rewarm": Arm("rewarm", "baseline with a linear warmup of B's LR", OBSERVE, rewarm=True),
    "replay1": Arm("anchor", "baseline + 1% of the sequences from A's train data", OBSERVE, replay=0.01),
    "replay5": Arm("anchor", "baseline + 5% of the sequences from A's train data", OBSERVE, replay=0.05),
    "best_rewarm": Arm("rewarm", "the --best arm with a linear warmup of B's LR", protected=True, rewarm=True, uses_best=True),
    "best_replay5": Arm("anchor", "the --best arm + 5% replay of A", protected=True, replay=0.05, uses_best=True),
}
GROUPS = {g: [n for n, a in ARMS.items() if a.group == g] for g in dict.fromkeys(a.group for a in ARMS.values())}
STAGE1 = [n for n, a in ARMS.items() if not a.uses_best]


def arm_flag_names():
    """Every training flag an arm (or the runner for every run) sets: the runner reserves them."""
    names = {k for a in ARMS.values() for k in a.flags}
    return names | {"data_dir", "num_iterations", "model_tag", "output_dir", "seed", "data_seed", "resume", "overwrite",
                    "adaptive_svd", "init_from", "init_data", "replay_data_dir", "replay_fraction", "extra_val_dir",
                    "eval_every", "warmup_ratio"}


def arm_names(text):
    """--arms: a comma list of arm names and group names (and stage1 / all), expanded in ARMS order; best = --best."""
    picked = set()
    for item in (t.strip() for t in text.split(",") if t.strip()):
        picked |= set(STAGE1 if item == "stage1" else ARMS if item == "all" else GROUPS.get(item, [item]))
    return [n for n in list(ARMS) + ["best"] if n in picked]


ARM_LIST = Check(lambda v: bool(arm_names(v)) and all(n in ARMS or n in GROUPS or n in ("stage1", "all", "best")
                                                      for n in (t.strip() for t in v.split(",") if t.strip())),
                 "a comma list of arm names, group names (" + ", ".join(GROUPS) + "), stage1, all or best")


def unavailable(arm, config_class):
    """Why an arm cannot run with this code (a flag or policy the training script lacks, e.g. before the method
    issue's dial and shift policy exist), or None."""
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    for name, value in arm.flags.items():
        if name not in fields:
            return f"the training script has no --{name}"
        valid = fields[name].metadata.get("valid")
        if valid is not None and not valid(value):
            return f"--{name}={value} is not accepted by the training script ({fields[name].metadata.get('rule')})"
    return None


@dataclasses.dataclass
class ForgettingConfig:
    data_a: str = required("domain A's data dir (train + val shards)")
    data_b: str = required("domain B's data dir")
    steps_a: int = required("optimizer steps of phase A", at_least(1))
    steps_b: int = required("optimizer steps of phase B (the control runs as many on A)", at_least(1))
    out: str = required("output dir: runs (base_checkpoints/), kept files (kept/), forgetting.json, forgetting.md, figures")
    seeds: str = flag("42,43,44,45,46", "comma list of seeds; each sets the init (--seed) and the data order (--data_seed) "
                                        "of its phase A and every phase B run")
    arms: str = flag("stage1", "the arms to run and report (baseline always): names, groups (" + ", ".join(GROUPS) + "), "
                               "stage1 (every arm without --best), all, best (the arm --best names)", ARM_LIST)
    best: str = flag("", "the protection arm the best_* arms build on (the second stage); the report names the best arm "
                         "by its criterion once the first stage has run",
                     one_of("", *[n for n, a in ARMS.items() if a.protected and not a.uses_best]))
    rewarm_ratio: float = flag(0.1, "the rewarm arms' linear warmup of B's LR, as a share of B's steps", between(0, 0.8, open_lo=True))
    measure_every: int = flag(50, "measure A's and B's val bpb every N steps of phase B (and before and after it)", at_least(1))
    eval_every_a: int = flag(250, "phase A evaluates A's val bpb every N steps (and at the end); -1 = only at the end",
                             at_least(1).or_(-1))
    jobs: int = flag(1, "runs at a time, each with one thread (at most two: the machine rule)", one_of(1, 2))
    force: bool = flag(False, "repeat runs that already finished (replacing their files)")
    table_only: bool = flag(False, "run nothing; report from the kept files in --out/kept")
    figures: bool = flag(True, "also write the figures (curves, pareto, detector, dose, detector_shares .png) to --out")
    train_flags: list[str] = passthrough("flags of scripts.base_train_adaptive_svd, shared by every run (the runner adds "
                                         + ", ".join(f"--{k}={v}" for k, v in DEFAULTS.items()) + " unless given)")


def a_tag(seed):
    return f"A_s{seed}"


def b_tag(arm, seed):
    return f"B_{arm}_s{seed}"


def b_finished(run_dir):
    return finished(run_dir, needs=("val_bpb", "extra_val_bpb"))


def arm_flags(name, settings):
    """Phase B's own training flags for arm `name` (besides the run's identity and data), from ARMS and the settings."""
    arm = ARMS[name]
    flags = dict(ARMS[settings["best"]].flags if arm.uses_best else arm.flags)
    if arm.replay:
        flags.update(replay_data_dir=settings["data_a"], replay_fraction=arm.replay)
    if arm.rewarm:
        flags["warmup_ratio"] = settings["rewarm_ratio"]
    return flags


def plan(settings, shared, out):
    """Every run: phase A per seed, then phase B per seed and arm (each after its seed's phase A)."""
    jobs = []
    for seed in settings["seeds"]:
        own = {"adaptive_svd": "false", "data_dir": settings["data_a"], "num_iterations": settings["steps_a"],
               "eval_every": settings["eval_every_a"], "model_tag": a_tag(seed), "output_dir": out, "seed": seed,
               "data_seed": seed}
        jobs.append(Job(a_tag(seed), checkpoint_dir(out, a_tag(seed)), training_argv(own, shared), finished))
    for seed in settings["seeds"]:
        source = os.path.join(checkpoint_dir(out, a_tag(seed)), CHECKPOINT_NAME)
        for name in settings["arms"]:
            arm = ARMS[name]
            if arm.derived:
                continue
            own = {"adaptive_svd": "true", "init_from": source,
                   "data_dir": settings["data_a"] if arm.control else settings["data_b"],
                   **({"init_data": "continue"} if arm.control else {}),
                   "extra_val_dir": settings["data_a"], "num_iterations": settings["steps_b"],
                   "eval_every": settings["measure_every"], "model_tag": b_tag(name, seed), "output_dir": out, "seed": seed,
                   "data_seed": seed, **arm_flags(name, settings)}
            jobs.append(Job(b_tag(name, seed), checkpoint_dir(out, b_tag(name, seed)), training_argv(own, shared),
                            b_finished, after=(a_tag(seed),)))
    return jobs


# -- reading the kept runs -------------------------------------------------------------------------------------

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


def _num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# The detectors whose readings the report compares between A -> B and A -> A: each says, for one layer-analysis
# record and its run's settings, whether it is flagged (True/False), or None when the record carries no reading
# (no basis yet, k = 0, or a field this code's analysis does not log). A suffix selects the reference basis.
DETECTORS = {
    "ratio >= 2 (v2 rule)": lambda r, c, sfx: (None if not _num(r.get("alignment_ratio" + sfx)) else
                                               r["alignment_ratio" + sfx] >= V2_RATIO_ENTER or
                                               (_num(r.get("update_alignment_ratio" + sfx)) and
                                                r["update_alignment_ratio" + sfx] >= V2_RATIO_ENTER)),
    "test: p <= alpha": lambda r, c, sfx: (None if not _num(r.get("alignment_p" + sfx)) or not _num(c.get("svd_alpha")) else
                                           r["alignment_p" + sfx] <= c["svd_alpha"]),
    "shift: shift >= enter and p <= alpha": lambda r, c, sfx: (
        None if not (_num(r.get("alignment_shift" + sfx)) and _num(r.get("alignment_p" + sfx)) and _num(c.get("svd_shift_enter")))
        else r["alignment_shift" + sfx] >= c["svd_shift_enter"] and r["alignment_p" + sfx] <= c["svd_alpha"]),
}
# The reference basis of a reading, by the suffix of its fields: the previous analysis' basis (what the policies read).
# The analysis logs no reading against A's basis held fixed, so there is no second reference to compare.
REFERENCES = {"previous": ""}


def detector_counts(records, config):
    """{detector: {reference: [flagged, readable]}} over the run's layer-analyses after its first (the first has no
    basis to read against)."""
    out = {}
    for name, rule in DETECTORS.items():
        for ref, sfx in REFERENCES.items():
            flagged = readable = 0
            for r in records:
                if "mode_after" not in r:
                    continue
                verdict = rule(r, config, sfx)
                if verdict is not None:
                    readable += 1
                    flagged += bool(verdict)
            out.setdefault(name, {})[ref] = [flagged, readable]
    return out


def phase_a_result(kept, seed):
    run = os.path.join(kept, a_tag(seed))
    summary = summarize(run)
    return {"seed": seed, "run": a_tag(seed), "final_val_bpb": summary["final_val_bpb"], "curve": evaluations(step_rows(run)),
            "steps": summary["steps"], "loop_s": summary["loop_s"], "median_step_s": summary["median_step_s"],
            "wall_s": wall_seconds(run), "epoch_at_end": data_position(run)[0]["epoch"]}


def phase_b_result(kept, arm, seed, a_final):
    """One phase B run from its kept files: the curves of A and B, forgetting, B learning, the detector's readings."""
    run = os.path.join(kept, b_tag(arm, seed))
    rows = step_rows(run)
    curve = [{"step": r["step"], "A_val_bpb": r["extra_val_bpb"], "B_val_bpb": r["val_bpb"]} for r in rows if "extra_val_bpb" in r]
    first, last = curve[0], curve[-1]
    records = svd_records(run)
    summary = summarize(run)
    config = read_config(run)["train_config"]
    loader = data_position(run)[0]
    svd = summary["svd"] or {}
    return {
        "arm": arm, "seed": seed, "run": b_tag(arm, seed), "dtype": config.get("dtype"), "curve": curve,
        "a_final_of_phase_a": a_final, "first_point_vs_phase_a": first["A_val_bpb"] - a_final,
        "a_bpb_before": first["A_val_bpb"], "a_bpb_after": last["A_val_bpb"], "forgetting": last["A_val_bpb"] - first["A_val_bpb"],
        "b_bpb_before": first["B_val_bpb"], "b_bpb_after": last["B_val_bpb"], "b_learning": first["B_val_bpb"] - last["B_val_bpb"],
        "replayed_share": loader["replayed"] / loader["sequences"] if "replayed" in loader else None,
        "epoch_at_end": loader.get("epoch"),
        "lowrank_share": svd.get("lowrank_share"), "to_lowrank": svd.get("to_lowrank"), "to_full": svd.get("to_full"),
        "mean_k": svd.get("mean_k"), "reasons": sorted({r["reason"] for r in records if r.get("action") in (Action.TO_LOWRANK, Action.TO_FULL)}),
        "loop_s": summary["loop_s"], "median_step_s": summary["median_step_s"], "analysis_s": summary["analysis_s"],
        "wall_s": wall_seconds(run), "detector": detector_series(records), "flags": detector_counts(records, config),
    }


def derived_result(arm, base):
    """freeze_all from the same seed's baseline: no parameter changes, so every later evaluation repeats the first."""
    keep = ("seed", "a_final_of_phase_a", "first_point_vs_phase_a", "a_bpb_before", "b_bpb_before")
    return {"arm": arm, "seed": base["seed"], "run": None, "derived": True, **{k: base[k] for k in keep},
            "a_bpb_after": base["a_bpb_before"], "forgetting": 0.0, "b_bpb_after": base["b_bpb_before"], "b_learning": 0.0}


def wall_seconds(run):
    """The run's wall time over every process start that was recorded to its end (None if one was not)."""
    times = [e.get("wall_s") for e in provenance(run)]
    return sum(times) if times and all(t is not None for t in times) else None


# -- statistics ------------------------------------------------------------------------------------------------

def _relative(iv, base):
    """The interval of a paired difference as shares of baseline's mean (None without an interval or a positive mean)."""
    if base is None or not base > 0:
        return {"mean": None, "lo": None, "hi": None}
    return {"mean": iv["mean"] / base, "lo": None if iv["lo"] is None else iv["lo"] / base,
            "hi": None if iv["hi"] is None else iv["hi"] / base}


def arm_stats(results, arms):
    """Per arm: mean ± std over seeds of forgetting, final B bpb and B learning; for the others, the paired per-seed
    differences to baseline with their 95% t-interval, that interval relative to baseline's mean, and the verdict."""
    by = {a: {r["seed"]: r for r in results if r["arm"] == a} for a in arms}
    out = {}
    for a in arms:
        entry = {}
        for key in ("forgetting", "b_bpb_after", "b_learning"):
            entry[key] = stats.t_interval([r[key] for r in by[a].values()])  # n, mean, sd and the mean's interval
        if a != "baseline":
            for key in ("forgetting", "b_bpb_after"):
                seeds, diffs = stats.paired({s: r[key] for s, r in by[a].items()}, {s: r[key] for s, r in by["baseline"].items()})
                base = stats.mean_std([by["baseline"][s][key] for s in seeds])[0]
                iv = stats.t_interval(diffs)
                entry[f"diff_{key}"] = {**iv, "seeds": seeds, "per_seed": diffs, "relative": _relative(iv, base)}
            entry["target"] = target_verdict(entry)
        out[a] = entry
    return out


def target_verdict(entry):
    """The research target for one arm: forgetting lowered by >= 30% of baseline's (mean), with the 95% interval of
    the paired difference entirely below zero, and the upper bound of the final B bpb's rise within 1% of baseline's."""
    f, b = entry["diff_forgetting"]["relative"], entry["diff_b_bpb_after"]["relative"]
    checks = {
        "forgetting_lowered_30pct": f["mean"] is not None and f["mean"] <= -FORGETTING_DROP_TARGET,
        "interval_excludes_zero": entry["diff_forgetting"]["hi"] is not None and entry["diff_forgetting"]["hi"] < 0,
        "b_cost_upper_bound_within_1pct": b["hi"] is not None and b["hi"] <= B_BPB_RISE_LIMIT,
    }
    return {**checks, "met": all(checks.values())}


def best_arm(st):
    """The declared criterion for --best: among the protection arms with an interval (>= 2 seeds) whose B-bpb cost's
    upper bound is within 1%, the largest mean relative reduction of forgetting. (name, why); name None if none."""
    candidates = [(a, e) for a, e in st.items() if ARMS.get(a) and ARMS[a].protected and not ARMS[a].uses_best
                  and e["diff_forgetting"]["lo"] is not None and e["diff_forgetting"]["relative"]["mean"] is not None]
    within = [(a, e) for a, e in candidates if e["target"]["b_cost_upper_bound_within_1pct"]]
    if within:
        a, e = min(within, key=lambda ae: ae[1]["diff_forgetting"]["relative"]["mean"])
        return a, (f"the largest mean reduction of forgetting ({fmt(e['diff_forgetting']['relative']['mean'], '+.1%')}) "
                   f"among the protection arms whose B-bpb cost's upper bound is within +{B_BPB_RISE_LIMIT:.0%}")
    if candidates:
        a, e = min(candidates, key=lambda ae: ae[1]["diff_forgetting"]["relative"]["mean"])
        return None, (f"no protection arm keeps the upper bound of its B-bpb cost within +{B_BPB_RISE_LIMIT:.0%}; the largest "
                      f"reduction is {a}'s ({fmt(e['diff_forgetting']['relative']['mean'], '+.1%')}, cost upper bound "
                      f"{fmt(e['diff_b_bpb_after']['relative']['hi'], '+.2%')})")
    return None, ("no protection arm has an interval (two seeds or more) relative to a baseline that forgets (a positive "
                  "mean forgetting)")


def detector_stats(results):
    """Per detector and reference: the share of layer-analyses flagged per seed during A -> B (baseline) and A -> A
    (control), mean with its 95% t-interval, and the paired difference (A -> B minus A -> A) with its interval."""
    by = {arm: {r["seed"]: r for r in results if r["arm"] == arm} for arm in ("baseline", "control")}
    out = {}
    for name in DETECTORS:
        for ref in REFERENCES:
            shares = {arm: {s: r["flags"][name][ref][0] / r["flags"][name][ref][1] for s, r in runs.items()
                            if r["flags"][name][ref][1]} for arm, runs in by.items()}
            if not shares["baseline"] and not shares["control"]:
                continue  # this code logs no reading for it
            entry = {arm: stats.t_interval(list(v.values())) if v else None for arm, v in shares.items()}
            seeds, diffs = stats.paired(shares["baseline"], shares["control"])
            entry["difference"] = {**stats.t_interval(diffs), "seeds": seeds} if diffs else None
            out.setdefault(name, {})[ref] = entry
    return out


# -- the report ------------------------------------------------------------------------------------------------

def arm_info(arms):
    """What the report and its figures need to know of each arm, in the data itself (the figures read only that)."""
    return {a: {"group": ARMS[a].group, "what": ARMS[a].what, "protected": ARMS[a].protected, "control": ARMS[a].control,
                "derived": ARMS[a].derived,
                "dose": ARMS[a].flags.get("svd_protect_frac", ARMS[a].flags.get("svd_embed_frac"))} for a in arms}


def tabulate(settings, command, kept):
    """Everything the report says, from the kept runs in `kept` (a folder of <tag>/ folders) and the settings."""
    seeds, arms = settings["seeds"], settings["arms"]
    phase_a = [phase_a_result(kept, seed) for seed in seeds]
    a_final = {a["seed"]: a["final_val_bpb"] for a in phase_a}
    results = []
    for arm in arms:
        for seed in seeds:
            if ARMS[arm].derived:
                base = next(r for r in results if r["arm"] == "baseline" and r["seed"] == seed)
                results.append(derived_result(arm, base))
            else:
                results.append(phase_b_result(kept, arm, seed, a_final[seed]))
    tags = [a_tag(s) for s in seeds] + [r["run"] for r in results if r["run"]]
    configs = {t: read_config(os.path.join(kept, t))["train_config"] for t in tags}
    b_config = configs[b_tag("baseline", seeds[0])]
    st = arm_stats(results, arms)
    best, why = best_arm(st)
    return {"command": command, "settings": settings, "arm_info": arm_info(arms),
            "target": {"forgetting_drop": FORGETTING_DROP_TARGET, "b_bpb_rise_limit": B_BPB_RISE_LIMIT},
            "run_commands": [open(os.path.join(kept, t, "command.txt")).read().strip() for t in tags],
            "provenance": made_with(os.path.join(kept, t) for t in tags), "dtypes": sorted({c.get("dtype") for c in configs.values()}),
            "thresholds": {k: b_config.get(k) for k in ("svd_interval", "svd_alpha", "svd_exit_p", "svd_shift_enter",
                                                       "svd_shift_exit", "svd_ratio_enter", "svd_ratio_exit")
                           if k in b_config},
            "phase_a": phase_a, "results": results, "stats": st, "best": {"arm": best, "why": why},
            "detector": detector_stats(results) if "control" in arms else None}


def _pct(x, spec="+.1%"):
    return fmt(x, spec)


def _rel_interval(rel, spec="+.1%"):
    return "n/a" if rel["lo"] is None else f"[{fmt(rel['lo'], spec)}, {fmt(rel['hi'], spec)}]"


def markdown(data):
    s, res, st = data["settings"], data["results"], data["stats"]
    arms = s["arms"]
    lines = [f"Command: `{data['command']}`", "",
             f"Phase A: {s['steps_a']} steps on {s['data_a']}; phase B: {s['steps_b']} steps from A's final checkpoint on "
             f"{s['data_b']} (the control: on A, from where phase A stopped reading); A's and B's val bpb every "
             f"{s['measure_every']} B-steps; seeds {', '.join(map(str, s['seeds']))} (each the init and the data order of "
             f"its runs); rewarm arms: linear warmup over {s['rewarm_ratio']:.0%} of B's steps; --best: {s['best'] or 'not given'}.",
             "", f"Every run's command: forgetting.json (run_commands) and kept/<run>/command.txt. Matmul dtype of the runs: "
                 f"{', '.join(map(str, data['dtypes']))}. The runs were made with:", ""]
    lines += markdown_table(["git commit", "uncommitted changes", "torch", "python", "CPU", "threads per run", "GPUs", "process starts"],
                            [[p["git_commit"] or "n/a", fmt(p["git_dirty"]), p["torch"], p["python"], p["cpu"], p["threads"],
                              ", ".join(p["gpus"]) or "none", p["starts"]] for p in data["provenance"]])
    lines += ["", "Phase A (A's val bpb at its end):", ""]
    lines += markdown_table(["seed", "steps", "final A val bpb", "summed step time (s)"],
                            [[a["seed"], fmt(a["steps"]), fmt(a["final_val_bpb"]), fmt(a["loop_s"], ".1f")] for a in data["phase_a"]])
    ran = [r for r in res if not r.get("derived")]
    worst = max(abs(r["first_point_vs_phase_a"]) for r in ran)
    lines += ["", f"First phase-B measurement of A (before any B update) vs phase A's final evaluation of A: largest "
                  f"difference {worst:.2e} over {len(ran)} runs (same weights, same val shard and token budget).", ""]
    if "control" in arms:
        wrapped = [r["seed"] for r in res if r["arm"] == "control" and r["epoch_at_end"] != next(
            a["epoch_at_end"] for a in data["phase_a"] if a["seed"] == r["seed"])]
        lines += [("The control read only A's data that phase A had not read (it ended in the epoch phase A ended in)."
                   if not wrapped else f"The control of seed(s) {wrapped} ran past the end of A's data into another epoch: "
                                       f"it re-read data phase A had read."), ""]
    lines += ["Every phase B run (forgetting = A's bpb after B minus before B; B learning = B's bpb before minus after; "
              "freeze_all is not run: nothing trains, so its numbers are the baseline's first measurement):", ""]
    rows = [[r["arm"], r["seed"], fmt(r["a_bpb_before"]), fmt(r["a_bpb_after"]), f"{r['forgetting']:+.4f}",
             fmt(r["b_bpb_before"]), fmt(r["b_bpb_after"]), f"{r['b_learning']:+.4f}", fmt(r.get("replayed_share"), ".3f"),
             fmt(r.get("lowrank_share"), ".3f"), f"{fmt(r.get('to_lowrank'))} / {fmt(r.get('to_full'))}",
             fmt(r.get("mean_k"), ".1f"), fmt(r.get("loop_s"), ".1f")] for r in res]
    lines += markdown_table(["arm", "seed", "A bpb before B", "A bpb after B", "forgetting", "B bpb before B", "B bpb after B",
                             "B learning", "replayed share", "protected share", "to protected / to full", "mean k",
                             "summed step time (s)"], rows)
    lines += [""] + summary_lines(st, data["arm_info"])
    lines += ["", f"Best protection arm by the declared criterion (for --best): {data['best']['arm'] or 'none'}: "
                  f"{data['best']['why']}.", ""]
    lines += _dose_lines(data) + _detector_lines(data) + _ratio_lines(data)
    lines += ["", "Time per run, mean over seeds (for planning): summed step time (the console's total time), and the wall "
                  "time of the run's process from start to end (start-up, evaluations and saves included; n/a where a "
                  "run's end was not recorded):", ""]

    def times(runs):
        loop = [r["loop_s"] for r in runs if r.get("loop_s") is not None]
        wall = [r["wall_s"] for r in runs if r.get("wall_s") is not None]
        return [len(runs), fmt(sum(loop) / len(loop) if loop else None, ".1f"),
                fmt(sum(wall) / len(wall) if len(wall) == len(runs) else None, ".1f")]

    lines += markdown_table(["phase / arm", "runs", "summed step time (s)", "wall time (s)"],
                            [["A", *times(data["phase_a"])]]
                            + [[a, *times([r for r in res if r["arm"] == a])] for a in arms if not ARMS[a].derived])
    return "\n".join(lines) + "\n"


def summary_lines(st, info):
    """The per-arm statistics table and the research target's verdicts (the arms' `protected` from info)."""
    lines = ["Per arm, mean ± std over seeds (sample std); the paired per-seed difference to baseline with its 95% "
             "t-interval (mean ± t(0.975, n-1) sd/sqrt(n)); relative = that difference and its interval divided by "
             "baseline's mean (of forgetting, or of the final B bpb: the cost):", ""]
    rows = []
    arms = list(st)
    for a in arms:
        e = st[a]
        row = [a] + [fmt_pm(e[key]["mean"], e[key]["sd"]) for key in ("forgetting", "b_bpb_after", "b_learning")]
        if a == "baseline" or info[a]["control"]:  # the control's "B" is A: no difference to baseline's B to judge
            row += ["-"] * 7
        else:
            f, b = e["diff_forgetting"], e["diff_b_bpb_after"]
            row += [f"{f['mean']:+.4f} {fmt_interval(f)}", _pct(f["relative"]["mean"]), _rel_interval(f["relative"]),
                    f"{b['mean']:+.4f} {fmt_interval(b)}", _pct(b["relative"]["mean"], "+.2%"),
                    _pct(b["relative"]["hi"], "+.2%"), "**yes**" if e["target"]["met"] else "no"]
        rows.append(row)
    lines += markdown_table(["arm", "forgetting", "final B bpb", "B learning", "forgetting - baseline [95% CI]", "relative",
                             "relative 95% CI", "final B bpb - baseline [95% CI]", "relative cost", "cost upper bound",
                             "target met"], rows)
    lines += ["", f"Research target: a protection arm lowers forgetting by at least {FORGETTING_DROP_TARGET:.0%} of "
                  f"baseline's (mean), the 95% interval of the paired difference excluding zero, and the upper bound of "
                  f"its final B bpb's rise at most {B_BPB_RISE_LIMIT:.0%} of baseline's.", ""]
    for a in (a for a in arms if a != "baseline" and not info[a]["control"]):
        e, t = st[a], st[a]["target"]
        f, b = e["diff_forgetting"], e["diff_b_bpb_after"]
        kind = "protected" if info[a]["protected"] else "not a protection arm, a reference point"
        lines.append(f"- {a} ({kind}): forgetting {_pct(f['relative']['mean'])} vs baseline, relative interval "
                     f"{_rel_interval(f['relative'])} ({'meets' if t['forgetting_lowered_30pct'] else 'misses'} "
                     f"-{FORGETTING_DROP_TARGET:.0%}; the interval {'excludes' if t['interval_excludes_zero'] else 'does not exclude'} "
                     f"zero); B-bpb cost {_pct(b['relative']['mean'], '+.2%')}, upper bound {_pct(b['relative']['hi'], '+.2%')} "
                     f"({'within' if t['b_cost_upper_bound_within_1pct'] else 'beyond'} +{B_BPB_RISE_LIMIT:.0%}): target "
                     f"{'**met**' if t['met'] else '**not met**'}.")
    met = [a for a in arms if a != "baseline" and info[a]["protected"] and st[a]["target"]["met"]]
    lines += ["", f"Verdict: {'met by ' + ', '.join(met) if met else 'no protection arm meets the target'}."]
    if min(e["forgetting"]["n"] for e in st.values()) < 2:
        lines.append("(With fewer than two seeds there is no interval, so no arm can meet the target.)")
    if not st["baseline"]["forgetting"]["mean"] > 0:
        lines.append("(Baseline's A bpb did not rise during B: there is no forgetting to lower, so no arm can meet the target.)")
    return lines


def _dose_lines(data):
    st, doses = data["stats"], [(g, [a for a in GROUPS[g] if a in data["stats"]]) for g in ("dose_blocks", "dose_embed")]
    if not any(a for _, a in doses):
        return []
    lines = ["Dose-response (static protection of a fraction of g; relative to baseline, with the relative 95% interval):", ""]
    rows = []
    for group, arms in doses:
        for a in arms:
            f, b = st[a]["diff_forgetting"]["relative"], st[a]["diff_b_bpb_after"]["relative"]
            rows.append([group.replace("dose_", ""), ARMS[a].flags.get("svd_protect_frac", ARMS[a].flags.get("svd_embed_frac")),
                         _pct(f["mean"]), _rel_interval(f), _pct(b["mean"], "+.2%"), _rel_interval(b, "+.2%")])
    return lines + markdown_table(["matrices", "fraction of g", "forgetting", "95% CI", "B-bpb cost", "95% CI"], rows) + [""]


def _detector_lines(data):
    det = data.get("detector")
    if det is None:  # no control arm: nothing to compare A -> B with
        return []
    if not det:
        return ["Detectors: no layer-analysis of the baseline or the control has a reading (k = 0 in every analysed "
                "matrix: A's weights hold no learned direction that stands apart), so A -> B and A -> A cannot be compared.",
                ""]
    lines = ["Detectors: share of the layer-analyses flagged during A -> B (baseline) and A -> A (the control), "
             "mean over seeds with its 95% t-interval, and the paired difference (A -> B minus A -> A). Both arms only "
             "observe, so the readings are those of the same training without any switch; the first analysis of each run "
             "(before any basis) has no reading. Reference basis: previous = the previous analysis' (what the policies read; "
             "the basis is refreshed at every analysis, so only the first reading is against A's learned directions).", ""]
    rows = []
    for name, refs in det.items():
        for ref, e in refs.items():
            cells = [fmt_pm(e[a]["mean"], e[a]["sd"], ".3f") + " " + fmt_interval(e[a], ".3f") if e[a] else "n/a"
                     for a in ("baseline", "control")]
            d = e["difference"]
            rows.append([name, ref, *cells, f"{d['mean']:+.3f} {fmt_interval(d, '.3f')}" if d else "n/a"])
    return lines + markdown_table(["detector", "reference", "A -> B (baseline)", "A -> A (control)", "difference"], rows) + [""]


def _ratio_lines(data):
    res, types = data["results"], list(LAYER_TYPES)
    lines = ["Detector readings per layer type: mean over the B analyses of the gradient and update alignment ratio against "
             "the previous analysis' basis (mean over blocks and seeds; random = 1):", ""]
    rows = []
    for a in data["settings"]["arms"]:
        if ARMS[a].derived:
            continue
        cells = []
        for t in types:
            pts = [p for r in res if r["arm"] == a for p in r["detector"].get(t, [])]
            g = [p["alignment_ratio"] for p in pts if p["alignment_ratio"] is not None]
            u = [p["update_alignment_ratio"] for p in pts if p["update_alignment_ratio"] is not None]
            cells.append(f"{fmt(sum(g) / len(g) if g else None, '.2f')} / {fmt(sum(u) / len(u) if u else None, '.2f')}")
        rows.append([a] + cells)
    return lines + markdown_table(["arm"] + [f"{LAYER_TYPES[t]} grad / update" for t in types], rows)


V2_ARMS = {"baseline": ("reference", False), "adaptive": ("detector", True), "static": ("static (v2)", True),
           "replay": ("anchor", False), "static_replay": ("anchor", True)}  # v2's variants: (group, protected)


def from_v2(data):
    """A v2 forgetting.json (variants; only the JSON was kept) in this report's terms: arms, and statistics with the
    relative intervals and the cost judged by its upper bound, recomputed from its per-run numbers."""
    arms = data["settings"]["variants"]
    results = [{**{k: v for k, v in r.items() if k != "variant"}, "arm": r["variant"]} for r in data["results"]]
    info = {a: {"group": V2_ARMS[a][0], "what": a, "protected": V2_ARMS[a][1], "control": False, "derived": False,
                "dose": None} for a in arms}
    return {**data, "settings": {**data["settings"], "arms": arms}, "results": results, "arm_info": info,
            "stats": arm_stats(results, arms), "detector": None,
            "target": {"forgetting_drop": FORGETTING_DROP_TARGET, "b_bpb_rise_limit": B_BPB_RISE_LIMIT}}


def rejudged_markdown(v2):
    """The v2 numbers (from_v2) re-judged: the per-arm table and the research target's verdicts of today's report."""
    return "\n".join([f"The v2 experiment (`{v2['command']}`), re-judged from its kept forgetting.json by today's "
                       f"criteria: relative intervals, and the B-bpb cost judged by the upper bound of its interval.", ""]
                      + summary_lines(v2["stats"], v2["arm_info"])) + "\n"


def write_report(data, out, figures=True):
    """forgetting.json, forgetting.md and (figures=True) the figures in `out`; returns (markdown text, figure paths)."""
    text = markdown(data)
    write_json_and_markdown(out, "forgetting", data, text)
    written = []
    if figures:
        written = forgetting_figures(data, out)
    return text, written
