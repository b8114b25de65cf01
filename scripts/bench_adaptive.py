"""Benchmark: wall time of adaptive-SVD training relative to the baseline, in one run on one machine.

Runs the real training loop (same data, seed and flags) as baseline, as the Phase 1 adaptive setup
(block0.attn.c_q) and with every attention matrix of every block analysed, alternating the runs
`--repeats` times so drift of the machine hits all of them alike. Compares the summed step times
(forward, backward, analysis, optimizer; evaluation and checkpoint writes are excluded).
Needs the data and tokenizer of `python -m scripts.prepare_data` and `python -m scripts.tok_train`.

  python -m scripts.bench_adaptive [--steps=100] [--repeats=2] [--depth=4] [--svd_interval=20] [--dtype=auto]
"""

import contextlib
import io
import tempfile
from dataclasses import dataclass

from nanochat.adaptive_cycle import AdaptiveConfig, AdaptiveSVDHook
from nanochat.cli import flag, parse_args
from nanochat.common import run_cli
from nanochat.train import train


@dataclass
class BenchConfig:
    steps: int = flag(100, "training steps per run")
    repeats: int = flag(2, "alternating repetitions of the three runs")
    depth: int = flag(4, "model depth")
    svd_interval: int = flag(20, "analysis interval of the adaptive runs")
    device_type: str = flag("cpu", "cpu | cuda | mps")
    dtype: str = flag("auto", "matmul dtype of every run: auto | float32 | bfloat16")


def timed_run(cfg, variant, out_dir):
    common = dict(depth=cfg.depth, max_seq_len=512, device_batch_size=1, total_batch_size=512, eval_tokens=512,
                  num_iterations=cfg.steps, eval_every=-1, sample_every=-1, device_type=cfg.device_type,
                  svd_interval=cfg.svd_interval, dtype=cfg.dtype, output_dir=out_dir)
    targets = {"phase1 (block0 c_q)": dict(adaptive_svd_target_layer=0, svd_targets="c_q"),
               "all attention": dict(adaptive_svd_target_layer=-1, svd_targets="attn")}
    run_cfg = AdaptiveConfig(**common, **targets.get(variant, {}), adaptive_svd=variant != "baseline")
    hook = AdaptiveSVDHook(run_cfg) if run_cfg.adaptive_svd else None
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        result = train(run_cfg, hook=hook, default_tag=variant.split()[0])
    switches = log.getvalue().count("SWITCHED")
    return result["total_time"], switches


def main(argv):
    cfg = parse_args(BenchConfig, argv, "python -m scripts.bench_adaptive", __doc__)
    variants = ["baseline", "phase1 (block0 c_q)", "all attention"]
    totals = {v: 0.0 for v in variants}
    switches = {v: 0 for v in variants}
    with tempfile.TemporaryDirectory() as out_dir:
        for rep in range(cfg.repeats):
            for v in variants:
                t, s = timed_run(cfg, v, out_dir)
                totals[v] += t
                switches[v] += s
                print(f"repeat {rep + 1}/{cfg.repeats} {v:<20} {t:7.2f} s of step time ({cfg.steps} steps, {s} switches)")
    base = totals["baseline"]
    print(f"\ndepth {cfg.depth}, seq 512, batch 512 tokens, {cfg.steps} steps, svd_interval {cfg.svd_interval}, {cfg.device_type}, "
          f"--dtype={cfg.dtype}")
    for v in variants:
        print(f"  {v:<20} {totals[v] / cfg.repeats:7.2f} s/run  ratio to baseline {totals[v] / base:.3f}")


if __name__ == "__main__":
    run_cli(main)
