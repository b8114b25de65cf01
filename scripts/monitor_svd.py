"""Follow a run's svd_metrics.jsonl and train_metrics.jsonl: print switches, r changes, threshold crossings
and evaluations as they happen.

    python -m scripts.monitor_svd RUN_DIR            # print what is there, then keep following (Ctrl-C stops)
    python -m scripts.monitor_svd RUN_DIR --once     # print what is there and exit
    python -m scripts.monitor_svd RUN_DIR --idle_exit=600   # stop after 10 minutes without a new line

The thresholds are the run's own: train_config in RUN_DIR/config.json, or for a job that has not
saved yet its command.txt parsed with the training script's flag definitions (never a separate copy).
The rules are the method's own table (nanochat.adaptive_svd.RULES, the one decide() reads): for each
rule enabled in the run and each condition it reads, a crossing is printed when the metric moves to the
other side of the condition's threshold between two analyses of a layer in the rule's mode (and at a
layer's first analysis in that mode if it starts on the side the rule acts on). With the defaults
(policy adaptive):
  full mode:     alignment_p <= svd_alpha     (gradient_clobbering_risk)
  low-rank mode: alignment_p >= svd_exit_p    (clobbering_risk_passed)
Every evaluation row of train_metrics.jsonl is printed as it arrives (val bpb, and extra_val_bpb when the
run measures a second validation set, e.g. domain A during a forgetting experiment's phase B).
"""

import dataclasses
import os
import time
from types import SimpleNamespace

from nanochat.adaptive_cycle import SVD_METRICS
from nanochat.adaptive_svd import RULES, Action
from nanochat.cli import above, at_least, flag, parse_args, positional
from nanochat.common import UserError, run_cli
from nanochat.runs import Follower, run_settings
from nanochat.train import TRAIN_METRICS


@dataclasses.dataclass
class MonitorConfig:
    run_dir: str = positional("the run's checkpoint folder (holds svd_metrics.jsonl)")
    once: bool = flag(False, "print what is there and exit")
    poll: float = flag(2.0, "seconds between looks at the file", above(0))
    idle_exit: float = flag(0.0, "exit after this many seconds without a new line (0 = never)", at_least(0))
    quiet_analyses: bool = flag(False, "do not print a line per analysis step")


class Monitor:
    """Turns analysis records into event lines; remembers each layer's previous record."""

    @staticmethod
    def _side(rule, rec, metric, op, t):
        """True when the record's metric is on the side the rule acts on, None when not comparable."""
        v = rec.get(metric)
        if rec.get("mode") != rule.mode or not isinstance(v, (int, float)) or isinstance(v, bool):
            return None
        return v >= t if op == ">=" else v <= t

    def __init__(self, thresholds):
        self.thresholds = thresholds
        self.prev = {}  # layer -> last record with a decision

    def feed(self, rec):
        layer, step = rec.get("layer"), rec.get("step")
        head = f"step {step:>6} {layer}"
        if rec.get("action") == Action.SKIPPED:
            return [f"{head}: analysis skipped ({rec.get('reason')})"]
        if "mode_after" not in rec:
            return []
        events = []
        prev = self.prev.get(layer)
        if rec["action"] in (Action.TO_LOWRANK, Action.TO_FULL):
            events.append(f"{head}: SWITCH {rec['mode']} -> {rec['mode_after']} (r={rec['r_after']}) reason={rec['reason']}")
        elif prev is not None and rec.get("r_after") != prev.get("r_after"):
            events.append(f"{head}: r {prev['r_after']} -> {rec['r_after']} ({rec['mode_after']})")
        settings = SimpleNamespace(**self.thresholds)
        for rule in RULES:
            if not rule.enabled(settings):
                continue
            for metric, op, threshold in rule.conditions:
                t = self.thresholds.get(threshold)
                now = None if t is None else self._side(rule, rec, metric, op, t)
                if now is None:
                    continue
                before = None if prev is None else self._side(rule, prev, metric, op, t)
                if (before is None and now) or (before is not None and now != before):
                    side = f"-> {rule.reason}" if now else "-> back on the quiet side"
                    events.append(f"{head}: {metric}={rec[metric]:.4g} crossed {threshold}={t} {side}")
        self.prev[layer] = rec
        return events


def evaluation_line(row):
    """The line for a train_metrics.jsonl row that carries an evaluation, else None."""
    if not isinstance(row.get("val_bpb"), (int, float)):
        return None
    extra = f" | extra val bpb {row['extra_val_bpb']:.4f}" if isinstance(row.get("extra_val_bpb"), (int, float)) else ""
    return f"step {row.get('step'):>6} evaluation: val bpb {row['val_bpb']:.4f}{extra}"


def thresholds_of(run_dir):
    settings, source = run_settings(run_dir)
    if settings is None:
        raise UserError(f"no config.json or command.txt in {run_dir}: the thresholds of this run are unknown "
                        f"(config.json appears with the first checkpoint; use --save_every for long jobs)")
    return {k: v for k, v in settings.items() if k.startswith("svd_")}, source


def main(argv):
    args = parse_args(MonitorConfig, argv, prog="python -m scripts.monitor_svd", description=__doc__)
    thresholds, source = thresholds_of(args.run_dir)
    print(f"thresholds from {source}: " + ", ".join(f"{k}={thresholds[k]}" for k in sorted(thresholds)
                                                    if k in {c[2] for r in RULES for c in r.conditions}), flush=True)
    monitor, follower = Monitor(thresholds), Follower(os.path.join(args.run_dir, SVD_METRICS))
    steps = Follower(os.path.join(args.run_dir, TRAIN_METRICS))
    last_new, last_step = time.time(), None
    try:
        while True:
            rows = steps.new_records()
            for line in filter(None, map(evaluation_line, rows)):
                print(line, flush=True)
            recs = follower.new_records()
            for rec in recs:
                if not args.quiet_analyses and rec.get("step") != last_step:
                    last_step = rec.get("step")
                    print(f"--- analysis at step {last_step}", flush=True)
                for line in monitor.feed(rec):
                    print(line, flush=True)
            if recs or rows:
                last_new = time.time()
            if args.once or (args.idle_exit and time.time() - last_new > args.idle_exit):
                break
            time.sleep(args.poll)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    run_cli(main)
