"""Phase 2: baseline vs adaptive SVD over seeds, with the same data order, tokens and hyperparameters per seed.

    python -m scripts.compare_runs --out=/tmp/p2 --seeds=42,43,44,45,46 --jobs=2 -- --depth=4 --max_seq_len=256 \\
        --device_batch_size=1 --total_batch_size=256 --num_iterations=2000 --device_type=cpu --dtype=float32 \\
        --adaptive_svd_target_layer=-1 --svd_targets=attn --svd_interval=50

Per seed two runs of `python -m scripts.base_train_adaptive_svd <flags> --seed=S --data_seed=S`, each in its own
process with one thread: the baseline adds --adaptive_svd=false (the identical loop without the hook). They go to
<out>/base_checkpoints/{baseline,adaptive}_s<S>/ with their console (train.log), command (command.txt) and
provenance (provenance.json). Every run trains in one matmul dtype: --dtype=float32 unless the training flags give
float32 or bfloat16 (--dtype=auto, where each run would choose on its own, is refused). --jobs=2 runs a seed's baseline and adaptive run at the same time (both see the
same contention; the next seed starts when both are done). A run whose files show it finished with the same
command is reused, one that was stopped continues with --resume; --force=true repeats them.

Each finished run is kept in <out>/kept/<tag>/ (config, command, provenance, data position, gzipped metrics) and
the report is computed from the kept files alone: <out>/comparison.json and <out>/comparison.md, per run, per seed
and as mean ± std over seeds with 95% t-intervals: the final val bpb, the bpb ratio adaptive/baseline, the time
ratios (median step, summed step time, and steps x median + analysis time, robust to pauses of a shared machine),
switch counts, the share of layer-analyses in protected mode and the mean number of learned directions k; and
whether the research target (the upper bound of the bpb ratio's 95% interval at most 1.005) is met. With
--figures=true (default) the figures of scripts.plot_svd for every seed go to <out>/figures/ (the `plots` extra).
--table_only=true reports from <out>/kept without running; `python -m scripts.rebuild_evidence` rebuilds a kept
comparison's report.
"""

import dataclasses
import os

from nanochat.cli import flag, one_of, parse_args, passthrough, required
from nanochat.common import UserError, run_cli
from nanochat.comparison import DEFAULTS, RESERVED, jobs_for, tabulate, write_figures, write_report
from nanochat.jobs import check_pinned_dtype, check_reserved, parse_seeds, run_jobs, with_defaults
from nanochat.plots import pyplot
from nanochat.runs import keep_run

KEPT = "kept"


@dataclasses.dataclass
class CompareConfig:
    out: str = required("output dir: runs, kept files (kept/), comparison.json, comparison.md, figures/")
    seeds: str = flag("42,43,44,45,46", "comma list of seeds; one baseline + one adaptive run each (the init and the "
                                        "data order of both)")
    jobs: int = flag(1, "runs at a time, each with one thread: 2 runs a seed's baseline and adaptive run together",
                     one_of(1, 2))
    force: bool = flag(False, "repeat runs that already finished (replacing their files)")
    table_only: bool = flag(False, "run nothing; report from the kept files in --out/kept")
    figures: bool = flag(True, "also write scripts.plot_svd's figures of every seed to <out>/figures")
    train_flags: list[str] = passthrough("flags of scripts.base_train_adaptive_svd, shared by every run (the runner adds "
                                         "--dtype=float32 unless given)")


def main(argv):
    args = parse_args(CompareConfig, argv, prog="python -m scripts.compare_runs", description=__doc__)
    seeds = parse_seeds(args.seeds)
    check_reserved(args.train_flags, RESERVED, "the comparison runner")
    train_argv = with_defaults(args.train_flags, DEFAULTS)
    from nanochat.adaptive_cycle import AdaptiveConfig
    # every training flag is checked here, not in the middle of the runs
    cfg = parse_args(AdaptiveConfig, train_argv, prog="python -m scripts.compare_runs -- [training flags]", description="")
    check_pinned_dtype(cfg, "the comparison")
    if args.figures:
        pyplot()  # so does a missing matplotlib, not after the runs
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    jobs = jobs_for(seeds, out, train_argv, args.jobs)
    kept = os.path.join(out, KEPT)
    if not args.table_only:
        run_jobs(jobs, args.jobs, force=args.force)
        for job in jobs:
            keep_run(job.run_dir, os.path.join(kept, job.tag))
    missing = [job.tag for job in jobs if not os.path.isdir(os.path.join(kept, job.tag))]
    if missing:
        raise UserError(f"no kept run for {', '.join(missing)} in {kept}; run without --table_only first")
    data = tabulate(seeds, train_argv, "python -m scripts.compare_runs " + " ".join(argv), kept)
    print(write_report(data, out))
    if args.figures:
        print("\n".join(write_figures(seeds, kept, os.path.join(out, "figures"))))


if __name__ == "__main__":
    run_cli(main)
