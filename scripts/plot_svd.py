"""Figures of a run (finished, still running, or copied back from the cluster) from its files.

    python -m scripts.plot_svd RUN_DIR [--baseline BASELINE_RUN_DIR] [--out DIR] [--spectra]
    python -m scripts.plot_svd --forgetting OUT/forgetting.json --out DIR

RUN_DIR is an adaptive run's checkpoint folder (train_metrics.jsonl, svd_metrics.jsonl, config.json or
command.txt). Writes PNGs to --out (default RUN_DIR/figures), drawn by
nanochat.plots (needs the `plots` extra, matplotlib):
  loss_bpb.png            training loss (debiased EMA) and val bpb over steps, adaptive vs baseline
  mode_rank.png           per layer: r after each analysis, low-rank periods shaded, switches marked
  alignment_ratio.png     per layer: gradient and update alignment_ratio and the random baseline (1)
  alignment_p.png         per layer: the gradient's alignment p-value (the entry test) and the run's own
                          svd_alpha and svd_exit_p thresholds drawn
  principal_alignment.png per layer: principal alignment of the gradient and its random baseline sqrt(k/n_out)
  subspace.png            per layer: subspace overlap (and above chance), reconstruction error
  spectra.png             (--spectra) singular values per layer at step 0 (re-created from the seed) and at
                          the checkpoint's step, for the run and the baseline (reads checkpoint.pt)
  --forgetting (scripts.forgetting's forgetting.json, or a v2 one; its runner writes these itself):
  curves.png              per group of arms: A's and B's val bpb during phase B, mean over seeds, next to baseline
  pareto.png              forgetting (rise of A's bpb during B) vs final B bpb: one point per arm and seed, each
                          arm's mean with its 95% t-interval on both axes
  detector.png            per observing or detecting arm: A's bpb during B next to the alignment ratios
                          (gradient and update) per layer type, mean over blocks and seeds
  dose.png                (dose arms) forgetting and B-bpb cost relative to baseline vs the protected fraction of g
  detector_shares.png     (with the control) each detector's share of flagged layer-analyses, A -> B vs A -> A
"""

import dataclasses
import json
import os

from nanochat.cli import flag, parse_args, positional
from nanochat.common import UserError, run_cli
from nanochat.forgetting import from_v2
from nanochat.plots import forgetting_figures, make_figures


@dataclasses.dataclass
class PlotConfig:
    run_dir: str = positional("an adaptive run's checkpoint folder", default="")
    baseline: str = flag("", "the baseline run's checkpoint folder (loss/bpb and spectra comparison)")
    out: str = flag("", "where the PNGs go; empty = RUN_DIR/figures (for --forgetting: next to its file)")
    prefix: str = flag("", "prefix of every file name")
    spectra: bool = flag(False, "also plot singular-value spectra from checkpoint.pt")
    forgetting: str = flag("", "forgetting.json of scripts.forgetting: its curves, Pareto and detector figures")


def main(argv):
    args = parse_args(PlotConfig, argv, prog="python -m scripts.plot_svd", description=__doc__)
    written = []
    if args.forgetting:
        if not os.path.isfile(args.forgetting):
            raise UserError(f"{args.forgetting} is not a file; give the forgetting.json that scripts.forgetting wrote")
        with open(args.forgetting) as f:
            data = json.load(f)
        if "variants" in data.get("settings", {}):
            data = from_v2(data)  # the v2 runner's JSON, in today's terms
        elif "arm_info" not in data:
            raise UserError(f"{args.forgetting} was written by an older scripts.forgetting; tabulate its runs again with "
                            f"the current one (--table_only=true), or rerun the experiment")
        written += forgetting_figures(data, args.out or os.path.dirname(os.path.abspath(args.forgetting)), args.prefix)
    if args.run_dir:
        if not os.path.isdir(args.run_dir):
            raise UserError(f"{args.run_dir} is not a folder; give a run's checkpoint folder")
        written += make_figures(args.run_dir, args.out or os.path.join(args.run_dir, "figures"), args.baseline,
                                args.spectra, args.prefix)
    if not args.run_dir and not args.forgetting:
        raise UserError("give a run folder and/or --forgetting FILE")
    if not written:
        raise UserError(f"nothing to plot yet in {args.run_dir} (no train_metrics.jsonl rows, no svd_metrics.jsonl)")
    for path in written:
        print(path)


if __name__ == "__main__":
    run_cli(main)
