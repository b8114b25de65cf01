"""Follow a run's svd_metrics.jsonl and print switches, r changes and threshold crossings as they happen.

    python -m scripts.monitor_svd RUN_DIR            # print what is there, then keep following (Ctrl-C stops)
    python -m scripts.monitor_svd RUN_DIR --once     # print what is there and exit
    python -m scripts.monitor_svd RUN_DIR --idle_exit=600   # stop after 10 minutes without a new line

The thresholds are the run's own: train_config in RUN_DIR/config.json, or for a job that has not
saved yet its command.txt parsed with the training script's flag definitions (never a separate copy).
A crossing is printed when a metric moves to the other side of its threshold between two analyses of
a layer (and at a layer's first analysis if it starts on the alarming side):
  alignment_ratio, update_alignment_ratio  >= svd_ratio_danger            (clobbering risk)
  subspace_overlap_above_chance            >= svd_overlap_stable          (stable principal subspace)
  reconstruction_error                     <= svd_reconstruction_max
  trainable_fraction (low-rank only)       <  svd_trainable_fraction_min  (factors cannot follow G)
  subspace_angle (low-rank only)           >  svd_angle_max
"""

import dataclasses
import json
import os
import sys
import time

from nanochat.cli import flag, parse_args, positional
from nanochat.common import UserError, run_cli
from scripts.run_logs import run_settings

# metric, threshold flag, comparison that is "on" (the side the policy acts on), label when on / off
RULES = [
    ("alignment_ratio", "svd_ratio_danger", lambda v, t: v >= t, "gradient concentrated on learned directions", "back below"),
    ("update_alignment_ratio", "svd_ratio_danger", lambda v, t: v >= t, "update concentrated on learned directions", "back below"),
    ("subspace_overlap_above_chance", "svd_overlap_stable", lambda v, t: v >= t, "principal subspace stable", "no longer stable"),
    ("reconstruction_error", "svd_reconstruction_max", lambda v, t: v <= t, "reconstruction safe", "reconstruction unsafe"),
    ("trainable_fraction", "svd_trainable_fraction_min", lambda v, t: v < t, "low-rank factors cannot follow the gradient", "factors follow again"),
    ("subspace_angle", "svd_angle_max", lambda v, t: v > t, "principal subspace rotated", "rotation back under"),
]
ALARM_AT_START = {"alignment_ratio", "update_alignment_ratio", "trainable_fraction", "subspace_angle"}
LOWRANK_ONLY = {"trainable_fraction", "subspace_angle"}  # the policy reads these only for a low-rank layer


@dataclasses.dataclass
class MonitorConfig:
    run_dir: str = positional("the run's checkpoint folder (holds svd_metrics.jsonl)")
    once: bool = flag(False, "print what is there and exit")
    poll: float = flag(2.0, "seconds between looks at the file")
    idle_exit: float = flag(0.0, "exit after this many seconds without a new line (0 = never)")
    quiet_analyses: bool = flag(False, "do not print a line per analysis step")


class Monitor:
    """Turns analysis records into event lines; remembers each layer's previous record."""

    def __init__(self, thresholds):
        self.thresholds = thresholds
        self.prev = {}  # layer -> last record with a decision

    def feed(self, rec):
        layer, step = rec.get("layer"), rec.get("step")
        head = f"step {step:>6} {layer}"
        if rec.get("action") == "skipped":
            return [f"{head}: analysis skipped ({rec.get('reason')})"]
        if "mode_after" not in rec:
            return []
        events = []
        prev = self.prev.get(layer)
        if rec["action"] in ("to_lowrank", "to_full"):
            events.append(f"{head}: SWITCH {rec['mode']} -> {rec['mode_after']} (r={rec['r_after']}) reason={rec['reason']}")
        elif prev is not None and rec["r_after"] != prev["r_after"]:
            events.append(f"{head}: r {prev['r_after']} -> {rec['r_after']} ({rec['mode_after']})")
        for metric, flag_name, on, label_on, label_off in RULES:
            t = self.thresholds.get(flag_name)
            v = rec.get(metric)
            if t is None or not isinstance(v, (int, float)) or (metric in LOWRANK_ONLY and rec.get("mode") != "lowrank"):
                continue
            now = on(v, t)
            before = None
            if (prev is not None and isinstance(prev.get(metric), (int, float))
                    and not (metric in LOWRANK_ONLY and prev.get("mode") != "lowrank")):
                before = on(prev[metric], t)
            if (before is None and now and metric in ALARM_AT_START) or (before is not None and now != before):
                events.append(f"{head}: {metric}={v:.4g} crossed {flag_name}={t} -> {label_on if now else label_off}")
        self.prev[layer] = rec
        return events


class Follower:
    """Reads complete new lines of a growing file; starts over if the file is replaced or truncated."""

    def __init__(self, path):
        self.path, self.offset, self.buffer, self.inode = path, 0, "", None

    def new_records(self):
        if not os.path.exists(self.path):
            return []
        st = os.stat(self.path)
        if self.inode is not None and (st.st_ino != self.inode or st.st_size < self.offset):
            self.offset, self.buffer = 0, ""  # a new run rewrote the file
        self.inode = st.st_ino
        with open(self.path) as f:
            f.seek(self.offset)
            chunk = f.read()
            self.offset = f.tell()
        self.buffer += chunk
        lines = self.buffer.split("\n")
        self.buffer = lines.pop()  # an incomplete last line waits for its end
        out = []
        for line in lines:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    print(f"(unreadable line skipped: {line[:60]}...)", file=sys.stderr)
        return out


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
                                                    if k in {r[1] for r in RULES}), flush=True)
    monitor, follower = Monitor(thresholds), Follower(os.path.join(args.run_dir, "svd_metrics.jsonl"))
    last_new, last_step = time.time(), None
    try:
        while True:
            recs = follower.new_records()
            for rec in recs:
                if not args.quiet_analyses and rec.get("step") != last_step:
                    last_step = rec.get("step")
                    print(f"--- analysis at step {last_step}", flush=True)
                for line in monitor.feed(rec):
                    print(line, flush=True)
            if recs:
                last_new = time.time()
            if args.once or (args.idle_exit and time.time() - last_new > args.idle_exit):
                break
            time.sleep(args.poll)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    run_cli(main)
