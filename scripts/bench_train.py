"""Benchmark: model FLOP/s of the Phase 1 training step as a fraction of this machine's fp32 matmul peak.

In one run on the same machine it measures (1) the best fp32 matmul throughput over a few square
sizes (the "peak"), and (2) the training step of the researcher's Phase 1 configuration (depth 4,
seq 512, device batch 1, total batch 512) split into forward, backward and optimizer time (medians
over the timed steps), then
prints model FLOP/s (nanochat's FLOPs/token estimate x tokens / step time) over that peak.
Synthetic tokens: the step's cost does not depend on the data.

  python -m scripts.bench_train [--steps=20] [--depth=4] [--seq=512] [--batch=1] [--device_type=cpu]
"""

import statistics
import time
from dataclasses import dataclass

import torch

from nanochat.cli import flag, parse_args
from nanochat.common import check_device_type, run_cli
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import build_optimizers
from nanochat.train import clip_gradients


@dataclass
class BenchConfig:
    steps: int = flag(20, "timed training steps (after 3 warm-up steps)")
    depth: int = flag(4, "model depth")
    seq: int = flag(512, "sequence length")
    batch: int = flag(1, "device batch size")
    vocab: int = flag(65536, "vocabulary size")
    device_type: str = flag("cpu", "cpu | cuda | mps")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device, dtype=torch.float32, sizes=(512, 1024, 2048), seconds=1.0):
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


def main(argv):
    cfg = parse_args(BenchConfig, argv, "python -m scripts.bench_train", __doc__)
    device = torch.device(check_device_type(cfg.device_type))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    peak = matmul_peak(device)
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s")

    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(cfg.depth, cfg.vocab, cfg.seq))
    model.to_empty(device=device)
    model.init_weights()
    muon, adamw = build_optimizers(model, 0.02, 0.2, 0.004)
    x = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), device=device)
    y = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq), device=device)
    times = {"forward": [], "backward": [], "optimizer": []}
    for i in range(3 + cfg.steps):
        t0 = time.perf_counter()
        loss = model(x, y)
        sync(device)
        t1 = time.perf_counter()
        loss.backward()
        clip_gradients(model, 1.0)
        sync(device)
        t2 = time.perf_counter()
        muon.step()
        adamw.step()
        model.zero_grad(set_to_none=True)
        sync(device)
        t3 = time.perf_counter()
        if i >= 3:
            times["forward"].append(t1 - t0)
            times["backward"].append(t2 - t1)
            times["optimizer"].append(t3 - t2)
    # medians: robust to the odd step slowed by something else on the machine
    times = {k: statistics.median(v) for k, v in times.items()}
    step = sum(times.values())
    flops = model.estimate_flops() * cfg.batch * cfg.seq
    print(f"Phase 1 step (depth {cfg.depth}, seq {cfg.seq}, batch {cfg.batch}), median of {cfg.steps}: {step * 1000:.1f} ms "
          f"({cfg.batch * cfg.seq / step:,.0f} tok/s)")
    for k, v in times.items():
        print(f"  {k:<9} {v * 1000:8.1f} ms  ({100 * v / step:4.1f}%)")
    print(f"model FLOPs/step: {flops / 1e9:.2f} GFLOP -> {flops / step / 1e9:.1f} GFLOP/s")
    print(f"model FLOP/s / matmul peak: {100 * flops / step / peak:.1f}%")


if __name__ == "__main__":
    run_cli(main)
