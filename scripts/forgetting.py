"""Forgetting experiment: train on domain A, continue on domain B, measure what A loses, per arm, over seeds.

    python -m scripts.forgetting --data_a=DIR_A --data_b=DIR_B --steps_a=1500 --steps_b=500 --out=/tmp/forget \\
        --jobs=2 -- --depth=4 --max_seq_len=256 --device_batch_size=1 --total_batch_size=256 \\
        --eval_tokens=32768 --device_type=cpu --svd_interval=25 --dtype=float32

Per seed (--seeds; each sets --seed and --data_seed of its runs):
  phase A  plain training on A (--adaptive_svd=false), shared by every arm    -> <out>/base_checkpoints/A_s<S>/
  phase B  a new run from A's final checkpoint (--init_from: weights and optimizer state; fresh step counter and
           LR schedule, fresh adaptive-SVD state, B's data from its start), one per arm -> .../B_<arm>_s<S>/
The arms (nanochat/forgetting.py, ARMS; every attention and MLP matrix of every block is analysed unless the
training flags say otherwise), by group:
  reference     baseline: plain training, the analysis only observes (--svd_policy=observe)
  localisation  freeze_embed, freeze_blocks (--freeze), freeze_all (nothing trains: not run, derived)
  dose_blocks   static_f10/25/50/75: static protection of that fraction of g of every block matrix
  dose_embed    embed_f10/25/50/75: static protection of the embedding and lm_head (--svd_embed_frac)
  detector      adaptive (default policy), shift (--svd_policy=shift)
  control       A -> more A from where phase A stopped reading (--init_data=continue), same step counts
  rewarm        baseline_rewarm: baseline with a linear warmup of B's LR (--rewarm_ratio); best_rewarm: the same on --best
  anchor        replay1, replay5 (1% / 5% of A's sequences); best_replay5: --best + 5% replay
--arms selects what runs (default stage1: every arm but the best_* ones). The report names the best protection arm
by its criterion; the second stage is the same command with --best=<that arm> and --arms=all (or
--arms=rewarm,anchor). An arm whose training flag or policy the training script lacks stops the runner before
anything runs, naming it.

Each run is `python -m scripts.base_train_adaptive_svd` in its own process with one thread; --jobs=2 runs two at
a time. Every run trains in one matmul dtype: --dtype=float32 unless the training flags give float32 or bfloat16
(--dtype=auto, where each run would choose on its own, is refused). A run whose files show it finished with the same command is reused and one that was stopped continues
with --resume; --force=true repeats them. Each finished run is kept in <out>/kept/<tag>/ (config, command,
provenance, data position, gzipped metrics), and the report is computed from the kept files alone:
<out>/forgetting.json, <out>/forgetting.md and with --figures=true (default; the `plots` extra) curves.png,
pareto.png, detector.png, dose.png and detector_shares.png. --table_only=true reports from <out>/kept without
running anything; `python -m scripts.rebuild_evidence` rebuilds a kept experiment's report.
"""

import os

from nanochat.adaptive_cycle import AdaptiveConfig
from nanochat.cli import parse_args
from nanochat.common import UserError, run_cli
from nanochat.dataset import list_shards
from nanochat.forgetting import (ARMS, DEFAULTS, ForgettingConfig, arm_flag_names, arm_names, plan, tabulate, unavailable,
                                 write_report)
from nanochat.jobs import check_pinned_dtype, check_reserved, parse_seeds, run_jobs, with_defaults
from nanochat.plots import pyplot
from nanochat.runs import keep_run

KEPT = "kept"


def parse(argv):
    """The runner's arguments and settings; every check that can fail, before anything runs."""
    args = parse_args(ForgettingConfig, argv, prog="python -m scripts.forgetting", description=__doc__)
    seeds = parse_seeds(args.seeds)
    arms = arm_names(args.arms)
    if "best" in arms:
        if not args.best:
            raise UserError("--arms names best (the arm --best names): give --best=<arm>")
        arms = [a for a in arms if a != "best"] + ([args.best] if args.best not in arms else [])
    arms = ["baseline"] + [a for a in ARMS if a in arms and a != "baseline"]  # every comparison is against baseline
    if any(ARMS[a].uses_best for a in arms) and not args.best:
        raise UserError(f"{', '.join(a for a in arms if ARMS[a].uses_best)} build on the best protection arm: give "
                        f"--best=<arm> (the first stage's report names it), or leave them out of --arms")
    check_reserved(args.train_flags, arm_flag_names(), "the forgetting experiment")
    for d in (args.data_a, args.data_b):
        list_shards(d, "train"), list_shards(d, "val")
    if os.path.realpath(args.data_a) == os.path.realpath(args.data_b):
        raise UserError("--data_a and --data_b are the same directory; give two domains (the control arm runs A -> A itself)")
    shared = with_defaults(args.train_flags, DEFAULTS)
    # every training flag is checked now, not after phase A; and every arm's own flags exist in this code
    cfg = parse_args(AdaptiveConfig, shared, prog="python -m scripts.forgetting -- [training flags]", description="")
    check_pinned_dtype(cfg, "the forgetting experiment")
    for a in arms:
        why = unavailable(ARMS[args.best if ARMS[a].uses_best else a], AdaptiveConfig)  # a best_* arm runs --best's flags
        if why:
            raise UserError(f"arm {a} cannot run with this code: {why}; leave it out of --arms")
    if args.figures:
        pyplot()  # so does a missing matplotlib
    out = os.path.abspath(args.out)
    settings = {"data_a": os.path.abspath(args.data_a), "data_b": os.path.abspath(args.data_b), "steps_a": args.steps_a,
                "steps_b": args.steps_b, "measure_every": args.measure_every, "eval_every_a": args.eval_every_a,
                "rewarm_ratio": args.rewarm_ratio, "seeds": seeds, "arms": arms, "best": args.best, "train_argv": shared}
    return args, out, settings


def main(argv):
    args, out, settings = parse(argv)
    os.makedirs(out, exist_ok=True)
    jobs = plan(settings, settings["train_argv"], out)
    kept = os.path.join(out, KEPT)
    if not args.table_only:
        run_jobs(jobs, args.jobs, force=args.force)
        for job in jobs:
            keep_run(job.run_dir, os.path.join(kept, job.tag))
    missing = [job.tag for job in jobs if not os.path.isdir(os.path.join(kept, job.tag))]
    if missing:
        raise UserError(f"no kept run for {', '.join(missing)} in {kept}; run without --table_only first")
    data = tabulate(settings, "python -m scripts.forgetting " + " ".join(argv), kept)
    text, written = write_report(data, out, figures=args.figures)
    print(text)
    print("\n".join(written))


if __name__ == "__main__":
    run_cli(main)
