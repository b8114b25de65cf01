"""Rebuild every table and figure of the kept experiments from their kept files alone (no run folder, no checkpoint).

    python -m scripts.rebuild_evidence                     # rewrite them: tables in experiments/runs/<experiment>/,
                                                           # figures in experiments/figures/<experiment>_*.png
    python -m scripts.rebuild_evidence --check=true        # write nothing; exit 1 naming every table that differs
    python -m scripts.rebuild_evidence --out=/tmp/rebuilt  # tables and figures under /tmp/rebuilt/<experiment>/

An experiment is a folder of --runs holding forgetting.json (scripts.forgetting) or comparison.json
(scripts.compare_runs):
  with kept/ (the runners keep every run's files there): the report (the .json and the .md) is computed again from
      kept/ and the settings its JSON records, exactly as the runner computed it (--check compares byte for byte),
      and its figures are drawn (a comparison: its first seed's run figures; the spectra need checkpoints: left out);
  without kept/ (v2: only the runner's JSON was kept): its numbers are re-judged by today's criteria (relative
      intervals; costs and the Phase 2 ratio judged by the upper bound of their interval) into rejudged.md, and a
      forgetting experiment's figures are drawn from its JSON.
"""

import dataclasses
import filecmp
import json
import os
import tempfile

from nanochat import comparison, forgetting
from nanochat.cli import flag, parse_args
from nanochat.common import UserError, run_cli
from nanochat.plots import forgetting_figures, pyplot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEPT = "kept"


class Differs(UserError):
    exit_status = 1  # --check found a rebuilt table that is not the kept one


@dataclasses.dataclass
class RebuildConfig:
    runs: str = flag(os.path.join(ROOT, "experiments", "runs"), "the folder of kept experiments")
    figures_dir: str = flag(os.path.join(ROOT, "experiments", "figures"), "where the figures go (as <experiment>_<name>.png)")
    out: str = flag("", "write tables and figures under OUT/<experiment>/ instead (empty: in place, figures to --figures_dir)")
    check: bool = flag(False, "write nothing: rebuild into a temporary folder and compare the tables with the kept ones "
                              "byte for byte (exit status 1 when any differs)")
    figures: bool = flag(True, "draw the figures too (the `plots` extra, matplotlib)")


def rebuild(exp_dir, tables_dir, figures_dir, prefix, figures=True):
    """One experiment's tables into tables_dir and figures into figures_dir; returns [(what, path)] written."""
    kept = os.path.join(exp_dir, KEPT)
    written = []
    if os.path.exists(os.path.join(exp_dir, "forgetting.json")):
        with open(os.path.join(exp_dir, "forgetting.json")) as f:
            recorded = json.load(f)
        if os.path.isdir(kept):
            data = forgetting.tabulate(recorded["settings"], recorded["command"], kept)
            forgetting.write_report(data, tables_dir, figures=False)
            written += [("table", os.path.join(tables_dir, n)) for n in ("forgetting.json", "forgetting.md")]
        else:
            data = forgetting.from_v2(recorded)
            written.append(("table", _write(os.path.join(tables_dir, "rejudged.md"), forgetting.rejudged_markdown(data))))
        if figures:
            written += [("figure", p) for p in forgetting_figures(data, figures_dir, prefix=prefix)]
    elif os.path.exists(os.path.join(exp_dir, "comparison.json")):
        with open(os.path.join(exp_dir, "comparison.json")) as f:
            recorded = json.load(f)
        if os.path.isdir(kept):
            data = comparison.tabulate(recorded["seeds"], recorded["train_argv"], recorded["command"], kept)
            comparison.write_report(data, tables_dir)
            written += [("table", os.path.join(tables_dir, n)) for n in ("comparison.json", "comparison.md")]
            if figures:  # the first seed's, as the report shows them (the runner draws every seed's)
                written += [("figure", p) for p in comparison.write_figures(recorded["seeds"][:1], kept, figures_dir, prefix)]
        else:
            written.append(("table", _write(os.path.join(tables_dir, "rejudged.md"), comparison.rejudged_markdown(recorded))))
    return written


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


def experiments(runs):
    if not os.path.isdir(runs):
        raise UserError(f"{runs} is not a folder of kept experiments")
    found = sorted(e for e in os.listdir(runs) if any(os.path.exists(os.path.join(runs, e, n))
                                                      for n in ("forgetting.json", "comparison.json")))
    if not found:
        raise UserError(f"no experiment (a folder with forgetting.json or comparison.json) in {runs}")
    return found


def main(argv):
    args = parse_args(RebuildConfig, argv, prog="python -m scripts.rebuild_evidence", description=__doc__)
    if args.figures:
        pyplot()
    names = experiments(args.runs)
    if args.check:
        differ = []
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                exp = os.path.join(args.runs, name)
                for what, path in rebuild(exp, os.path.join(tmp, name), os.path.join(tmp, "figures"), f"{name}_",
                                          figures=args.figures):
                    kept = os.path.join(exp, os.path.basename(path))
                    if what == "table":
                        same = os.path.exists(kept) and filecmp.cmp(path, kept, shallow=False)
                        print(f"{'same' if same else 'DIFFERS'}: {kept}")
                        differ += [] if same else [kept]
        if differ:
            raise Differs(f"{len(differ)} rebuilt table(s) differ from the kept ones: {', '.join(differ)}")
        return
    for name in names:
        exp = os.path.join(args.runs, name)
        tables = os.path.join(args.out, name) if args.out else exp
        figs = os.path.join(args.out, name) if args.out else args.figures_dir
        for what, path in rebuild(exp, tables, figs, f"{name}_", figures=args.figures):
            print(f"{what}: {path}")


if __name__ == "__main__":
    run_cli(main)
