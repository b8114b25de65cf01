"""Benchmark: wall time of adaptive-SVD training relative to the baseline, in one run on one machine.

Runs the real training loop (same data, seed and flags) as baseline, as the Phase 1 adaptive setup
(block0.attn.c_q) and with every attention and MLP matrix of every block analysed, alternating the
runs `--repeats` times so drift of the machine hits all of them alike. Compares the summed step times
(forward, backward, analysis, projection, optimizer; evaluation and checkpoint writes are excluded)
and counts switches. On a shared machine the sums drift by a few percent between runs of the same
code, so it also prints a contention-robust estimate from each run's files: steps x the median time of
the steps without an analysis, plus the analyses' own time (svd_metrics.jsonl), over the baseline's
steps x median; and the analyses' share of that. With --compile=true every run is compiled, and the graphs torch.compile built are
counted (a switch must not add one). Needs the data and tokenizer of `python -m scripts.prepare_data`
and `python -m scripts.tok_train`.

  python -m scripts.bench_adaptive [--steps=100] [--repeats=2] [--depth=4] [--svd_interval=20] [--compile=true] [--dtype=auto]
"""

import contextlib
import io
import os
import statistics
import tempfile
from dataclasses import dataclass

import torch._dynamo

from nanochat.adaptive_cycle import AdaptiveConfig, AdaptiveSVDHook
from nanochat.cli import at_least, flag, one_of, parse_args
from nanochat.common import DEVICE_TYPES, run_cli
from nanochat.precision import DTYPES
from nanochat.runs import analysis_seconds, read_jsonl, svd_records, svd_summary
from nanochat.train import TRAIN_METRICS, train


@dataclass
class BenchConfig:
    steps: int = flag(100, "training steps per run", at_least(1))
    repeats: int = flag(2, "alternating repetitions of the three runs", at_least(1))
    depth: int = flag(4, "model depth", at_least(1))
    svd_interval: int = flag(20, "analysis interval of the adaptive runs", at_least(1))
    device_type: str = flag("cpu", "cpu | cuda | mps", one_of(*DEVICE_TYPES))
    compile: bool = flag(False, "torch.compile every run")
    dtype: str = flag("auto", "matmul dtype of every run: auto | float32 | bfloat16", one_of("auto", *DTYPES))


def timed_run(cfg, variant, out_dir):
    common = dict(depth=cfg.depth, max_seq_len=512, device_batch_size=1, total_batch_size=512, eval_tokens=512,
                  num_iterations=cfg.steps, eval_every=-1, sample_every=-1, device_type=cfg.device_type,
                  svd_interval=cfg.svd_interval, output_dir=out_dir, compile=cfg.compile, dtype=cfg.dtype, overwrite=True)
    targets = {"phase1 (block0 c_q)": dict(adaptive_svd_target_layer=0, svd_targets="c_q"),
               "all attn + mlp": dict(adaptive_svd_target_layer=-1, svd_targets="all")}
    run_cfg = AdaptiveConfig(**common, **targets.get(variant, {}), adaptive_svd=variant != "baseline")
    hook = AdaptiveSVDHook(run_cfg) if run_cfg.adaptive_svd else None
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with contextlib.redirect_stdout(io.StringIO()):
        result = train(run_cfg, hook=hook, default_tag=variant.split()[0])
    records = svd_records(result["ckpt_dir"]) if run_cfg.adaptive_svd else []
    svd = svd_summary(records)
    switches = svd["to_lowrank"] + svd["to_full"] if svd else 0
    analysed = {r["step"] for r in records}
    dts = [r["dt"] for r in read_jsonl(os.path.join(result["ckpt_dir"], TRAIN_METRICS))[2:] if r["step"] not in analysed]
    return {"total": result["total_time"], "switches": switches, "median_dt": statistics.median(dts),
            "analysis": analysis_seconds(records), "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}


def main(argv):
    cfg = parse_args(BenchConfig, argv, "python -m scripts.bench_adaptive", __doc__)
    variants = ["baseline", "phase1 (block0 c_q)", "all attn + mlp"]
    runs = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as out_dir:
        for rep in range(cfg.repeats):
            for v in variants:
                r = timed_run(cfg, v, out_dir)
                runs[v].append(r)
                print(f"repeat {rep + 1}/{cfg.repeats} {v:<20} {r['total']:7.2f} s of step time ({cfg.steps} steps, "
                      f"median step {r['median_dt'] * 1e3:.1f} ms, analyses {r['analysis']:.2f} s, {r['switches']} switches"
                      + (f", {r['graphs']} compiled graphs)" if cfg.compile else ")"), flush=True)
    mean = {v: {k: statistics.mean(r[k] for r in runs[v]) for k in ("total", "median_dt", "analysis", "switches")}
            for v in variants}
    base_total, base_estimate = mean["baseline"]["total"], cfg.steps * mean["baseline"]["median_dt"]
    print(f"\ndepth {cfg.depth}, seq 512, batch 512 tokens, {cfg.steps} steps, svd_interval {cfg.svd_interval}, "
          f"{cfg.device_type}, compile {'on' if cfg.compile else 'off'}, --dtype={cfg.dtype}, {cfg.repeats} repeat(s)")
    for v in variants:
        m = mean[v]
        estimate = (cfg.steps * m["median_dt"] + m["analysis"]) / base_estimate
        extra = (f", compiled graphs {max(r['graphs'] for r in runs[v])} (baseline "
                 f"{max(r['graphs'] for r in runs['baseline'])})") if cfg.compile else ""
        print(f"  {v:<20} summed step time ratio {m['total'] / base_total:.3f} | robust estimate ratio {estimate:.3f} "
              f"(median step {m['median_dt'] * 1e3:.1f} ms, analyses {m['analysis']:.2f} s = "
              f"{100 * m['analysis'] / base_estimate:.2f}% of the baseline's time) | switches/run {m['switches']:.1f}{extra}")


if __name__ == "__main__":
    run_cli(main)
