"""Benchmark: the Phase 1 training step in fp32 and in bf16, what `--dtype=auto` picks, and compile vs eager.

In one run on the same machine it measures
1. the best fp32 and bf16 matmul throughput over a few square sizes (the "peaks");
2. what `--dtype=auto` resolves to here, and why;
3. the training step of the researcher's Phase 1 configuration (depth 4, seq 512, device batch 1,
   vocab 65,536) in fp32 eager (the path before --dtype existed) and in bf16 eager, the two models
   stepped alternately so that load from other processes hits both alike, each split into forward,
   backward and optimizer time (medians over the timed steps); then the auto choice against fp32
   and model FLOP/s (nanochat's FLOPs/token estimate x tokens / step time) over each peak;
4. the torch.compile'd step in the auto dtype against eager (alternating again), and whether
   `--compile=auto` (eager on CPU) is the faster choice here.
The machine's load average is printed with the numbers: on a shared machine they are only as quiet
as it was. Synthetic tokens: the step's cost does not depend on the data.

  python -m scripts.bench_train [--steps=20] [--depth=4] [--seq=512] [--batch=1] [--device_type=cpu] [--compile_check=true] [--threads=0]
"""

import os
import statistics
import time
from dataclasses import dataclass

import torch

from nanochat.cli import at_least, flag, one_of, parse_args
from nanochat.common import DEVICE_TYPES, check_device_type, run_cli
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import build_optimizers
from nanochat.precision import DTYPES, autocast_for, resolve_dtype
from nanochat.train import clip_gradients

PARTS = ("forward", "backward", "optimizer")
SAME = 0.05  # step times this close are a tie on a shared machine


@dataclass
class BenchConfig:
    steps: int = flag(20, "timed training steps of each variant (after 3 warm-up steps)", at_least(1))
    depth: int = flag(4, "model depth", at_least(1))
    seq: int = flag(512, "sequence length", at_least(2))
    batch: int = flag(1, "device batch size", at_least(1))
    vocab: int = flag(65536, "vocabulary size", at_least(2))
    device_type: str = flag("cpu", "cpu | cuda | mps", one_of(*DEVICE_TYPES))
    compile_check: bool = flag(True, "also time the torch.compile'd step against eager (compiling takes minutes on CPU)")
    threads: int = flag(0, "CPU threads; 0 = torch's default (all cores). 1 is steadier on a machine shared with other jobs",
                        at_least(0))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def load():
    return "load average %.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else "load average n/a"


def matmul_peak(device, dtype, sizes=(512, 1024, 2048), seconds=1.0):
    """Best achieved matmul FLOP/s over a few sizes: the practical peak of this machine."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        torch.mm(a, b)
        sync(device)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, b)
            reps += 1
        sync(device)
        best = max(best, 2 * n ** 3 * reps / (time.perf_counter() - t0))
    return best


class Variant:
    """One model with its optimizers, stepped the way nanochat/train.py steps it in `dtype`."""

    def __init__(self, cfg, device, dtype, compiled=False):
        torch.manual_seed(0)
        with torch.device("meta"):
            self.model = GPT(GPTConfig.from_depth(cfg.depth, cfg.vocab, cfg.seq))
        self.model.to_empty(device=device)
        self.model.init_weights()
        self.muon, self.adamw = build_optimizers(self.model, 0.02, 0.2, 0.004, ns_dtype=DTYPES[dtype])
        self.forward = torch.compile(self.model, dynamic=False) if compiled else self.model
        self.autocast = autocast_for(device.type, dtype)
        self.device = device
        self.times = {k: [] for k in PARTS}

    def step(self, x, y, record):
        t0 = time.perf_counter()
        with self.autocast:
            loss = self.forward(x, y)
        sync(self.device)
        t1 = time.perf_counter()
        loss.backward()
        clip_gradients(self.model, 1.0)
        sync(self.device)
        t2 = time.perf_counter()
        self.muon.step()
        self.adamw.step()
        self.model.zero_grad(set_to_none=True)
        sync(self.device)
        t3 = time.perf_counter()
        if record:
            for k, v in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2)):
                self.times[k].append(v)

    def medians(self):
        # medians: robust to the odd step slowed by something else on the machine
        return {k: statistics.median(v) for k, v in self.times.items()}


def race(variants, x, y, steps):
    """Warm up each variant, then step them alternately; returns their median times per part."""
    for v in variants:
        for _ in range(3):
            v.step(x, y, record=False)
    for _ in range(steps):
        for v in variants:
            v.step(x, y, record=True)
    return [v.medians() for v in variants]


def report(name, times, tokens, flops, peaks):
    step = sum(times.values())
    print(f"{name}: {step * 1000:.1f} ms/step ({tokens / step:,.0f} tok/s, {flops / step / 1e9:.1f} GFLOP/s = "
          + ", ".join(f"{100 * flops / step / p:.1f}% of the {k} peak" for k, p in peaks.items()) + ")")
    for k, v in times.items():
        print(f"  {k:<9} {v * 1000:8.1f} ms  ({100 * v / step:4.1f}%)")
    return step


def main(argv):
    cfg = parse_args(BenchConfig, argv, "python -m scripts.bench_train", __doc__)
    device = torch.device(check_device_type(cfg.device_type))
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}; {load()}")
    peaks = {"fp32": matmul_peak(device, torch.float32), "bf16": matmul_peak(device, torch.bfloat16)}
    print(f"matmul peak: fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s "
          f"(bf16/fp32 = {peaks['bf16'] / peaks['fp32']:.2f}); {load()}")
    auto, why = resolve_dtype("auto", device.type)
    print(f"--dtype=auto -> {auto} ({why})")

    x = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), device=device)
    y = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), device=device)
    tokens = cfg.batch * cfg.seq
    fp32, bf16 = race([Variant(cfg, device, "float32"), Variant(cfg, device, "bfloat16")], x, y, cfg.steps)
    with torch.device("meta"):
        flops = GPT(GPTConfig.from_depth(cfg.depth, cfg.vocab, cfg.seq)).estimate_flops() * tokens
    print(f"\nPhase 1 step (depth {cfg.depth}, seq {cfg.seq}, batch {cfg.batch}, vocab {cfg.vocab:,}, "
          f"{flops / 1e9:.2f} GFLOP), eager, median of {cfg.steps} alternating steps; {load()}")
    t_fp32 = report("fp32 eager (the path before --dtype)", fp32, tokens, flops, peaks)
    t_bf16 = report("bf16 eager", bf16, tokens, flops, peaks)
    t_auto = t_bf16 if auto == "bfloat16" else t_fp32
    print(f"auto ({auto}) step / fp32 step: {t_auto / t_fp32:.2f} ({t_fp32 / t_auto:.2f}x faster); "
          f"bf16 / fp32: {t_bf16 / t_fp32:.2f}")

    if cfg.compile_check:
        print(f"\ntorch.compile in {auto} (compiling...)")
        t0 = time.perf_counter()
        eager, compiled = Variant(cfg, device, auto), Variant(cfg, device, auto, compiled=True)
        compiled.step(x, y, record=False)
        print(f"first compiled step (compile time): {time.perf_counter() - t0:.0f} s")
        eager_t, compiled_t = race([eager, compiled], x, y, cfg.steps)
        print(f"median of {cfg.steps} alternating steps; {load()}")
        t_eager = report(f"{auto} eager", eager_t, tokens, flops, peaks)
        t_compiled = report(f"{auto} compiled", compiled_t, tokens, flops, peaks)
        ratio = t_compiled / t_eager
        default = "compiled" if device.type == "cuda" else "eager"
        if abs(ratio - 1) <= SAME:
            verdict = f"the same speed within {SAME:.0%}"
        else:
            faster = "compiled" if ratio < 1 else "eager"
            verdict = f"{faster} is faster" + ("" if faster == default else ", NOT the --compile=auto choice")
        print(f"compiled / eager: {ratio:.2f}: {verdict}; --compile=auto runs {default} on {device.type}")
    print(f"\ndone; {load()}")


if __name__ == "__main__":
    run_cli(main)
