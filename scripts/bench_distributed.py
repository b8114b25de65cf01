"""Benchmark: time of one adaptive-SVD analysis of the d20 layer set with 1 vs N gloo ranks (CPU).

    python -m scripts.bench_distributed                     # 1 block, 1 and 2 ranks, exact SVD
    python -m scripts.bench_distributed --blocks=20 --ranks=1,2,4 --svd_method=auto

A d20 block has six analysed matrices: c_q, c_k, c_v, attn.c_proj (1280x1280), mlp.c_fc (5120x1280)
and mlp.c_proj (1280x5120); the whole set is 20 blocks, 120 matrices. On CPU one analysis of all of
them takes minutes, so by default only --blocks=1 block is analysed (the same shapes in the same mix,
so the speed-up carries over and the full set costs 20/blocks times as much; the estimate is printed).

Each configuration runs the real hook (nanochat.adaptive_cycle.AdaptiveSVDHook) under torchrun with
gloo and one thread per rank (OMP_NUM_THREADS=1), on weights of d20 shape whose gradients and
drift between analyses are random but identical on every rank. The layers stay full-matrix
(switch thresholds out of reach) so every analysis does the same work; with --svd_method=exact every
layer gets a complete SVD, as a low-rank layer does at every analysis. Reported per analysis: wall
time (barrier to barrier), the SVD/metrics phase (slowest rank) and the exchange of plans
(all_gather_object + one broadcast per rank). The first analysis (baseline, no metrics yet) is
reported separately. Numbers, not assertions: on a busy or small machine N ranks only help as far as
N cores are free.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from nanochat.cli import Check, at_least, flag, one_of, parse_args
from nanochat.common import run_cli

WORLD_SIZES = Check(lambda v: all(x.strip().isdigit() and int(x) >= 1 for x in v.split(",")),
                    "a comma list of integers >= 1")


@dataclass
class BenchConfig:
    blocks: int = flag(1, "d20 blocks whose six matrices are analysed (20 = the whole d20 set)", at_least(1))
    ranks: str = flag("1,2", "comma list of world sizes to compare", WORLD_SIZES)
    analyses: int = flag(3, "analyses per configuration (the first one is the baseline)", at_least(1))
    svd_method: str = flag("exact", "exact | warm | auto (as --svd_method of the training script)",
                           one_of("exact", "warm", "auto"))
    model_dim: int = flag(1280, "model width (1280 = d20); heads of 128", Check(lambda v: v >= 128 and v % 128 == 0,
                                                                             "a multiple of 128"))
    worker: bool = flag(False, "internal: run as one torchrun rank")


def worker(cfg):
    import torch
    import torch.distributed as dist

    from nanochat.adaptive_cycle import AdaptiveConfig, AdaptiveSVDHook
    from nanochat.common import compute_init
    from nanochat.gpt import GPT, GPTConfig
    from nanochat.optim import build_optimizers
    from nanochat.hooks import Run

    ddp, rank, _, world, device = compute_init("cpu")
    d = cfg.model_dim
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=64, vocab_size=256, n_layer=cfg.blocks, n_head=d // 128, n_kv_head=d // 128, n_embd=d))
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    acfg = AdaptiveConfig(depth=cfg.blocks, adaptive_svd_target_layer=-1, svd_targets="all", svd_method=cfg.svd_method,
                          svd_interval=1, svd_policy="observe", device_type="cpu")  # analyse, never switch
    hook = AdaptiveSVDHook(acfg)
    hook.prepare_model(model)
    modules = [layer.module for layer in hook.layers.values()]
    with torch.no_grad():
        for m in modules:  # c_proj matrices start at zero; give every matrix a trained-looking spectrum
            n_out, n_in = m.weight.shape
            m.weight.copy_(torch.randn(n_out, n_in) / n_in ** 0.5 + 0.05 * torch.randn(n_out, 8) @ torch.randn(8, n_in))
    muon, adamw = build_optimizers(model, 0.02, 0.2, 0.004)
    out_dir = tempfile.mkdtemp(prefix="bench_distributed_") if rank == 0 else "/nonexistent"
    hook.attach(Run(acfg, model, muon, adamw, device, out_dir, lambda *a: None, rank, world))

    timing = {"plan": 0.0, "plan_cpu": 0.0, "exchange": 0.0}
    plan_layer, exchange = hook._plan, getattr(hook, "_exchange", None)

    def timed_plan(*args):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return plan_layer(*args)
        finally:
            timing["plan"] += time.perf_counter() - t0
            timing["plan_cpu"] += time.process_time() - c0

    def timed_exchange(*args):
        t0 = time.perf_counter()
        try:
            return exchange(*args)
        finally:
            timing["exchange"] += time.perf_counter() - t0

    hook._plan = timed_plan
    if exchange is not None:
        hook._exchange = timed_exchange
    results = []
    for step in range(1, cfg.analyses + 1):
        g = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for m in modules:
                m.weight.add_(torch.randn(m.weight.shape, generator=g), alpha=1e-3)
                m.weight.grad = torch.randn(m.weight.shape, generator=g)
        timing.update(plan=0.0, plan_cpu=0.0, exchange=0.0)
        if ddp:
            dist.barrier()
        t0 = time.perf_counter()
        hook.analyze(step)
        if ddp:
            dist.barrier()
        wall = time.perf_counter() - t0
        mine = torch.tensor([timing["plan"], timing["plan_cpu"], timing["exchange"]], dtype=torch.float64)
        every = [torch.zeros(3, dtype=torch.float64) for _ in range(world)]
        if ddp:  # per rank; the exchange time of the last rank to get there is the pure communication
            dist.all_gather(every, mine)
        else:
            every = [mine]
        results.append({"step": step, "wall": wall, "plan": [t[0].item() for t in every],
                        "plan_cpu": [t[1].item() for t in every], "exchange_min": min(t[2].item() for t in every)})
    if rank == 0:
        print("BENCH " + json.dumps({"world": world, "matrices": len(modules), "results": results}), flush=True)
    if ddp:
        dist.barrier()  # nobody leaves while another rank still talks to it
        dist.destroy_process_group()


def run_config(cfg, n):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m", "scripts.bench_distributed",
           "--worker", f"--blocks={cfg.blocks}", f"--analyses={cfg.analyses}", f"--svd_method={cfg.svd_method}",
           f"--model_dim={cfg.model_dim}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    line = next((l for l in r.stdout.splitlines() if l.startswith("BENCH ")), None)
    if r.returncode != 0 or line is None:
        sys.exit(f"bench with {n} rank(s) failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(line[len("BENCH "):])


def main(argv):
    cfg = parse_args(BenchConfig, argv, prog="python -m scripts.bench_distributed", description=__doc__)
    if cfg.worker:
        return worker(cfg)
    ranks = [int(x) for x in cfg.ranks.split(",")]
    d = cfg.model_dim
    print(f"Analysis of {cfg.blocks} block(s) x 6 matrices ({d}x{d} x4, {4 * d}x{d}, {d}x{4 * d}), svd_method={cfg.svd_method}, "
          f"{cfg.analyses} analyses per run, gloo on CPU, OMP_NUM_THREADS=1 per rank; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start")
    rows = []
    for n in ranks:
        out = run_config(cfg, n)
        later = out["results"][1:] or out["results"]
        mean = lambda key: sum(r[key] for r in later) / len(later)
        plans = [sum(r["plan_cpu"][i] for r in later) / len(later) for i in range(n)]
        rows.append((n, out["results"][0]["wall"], mean("wall"), plans, mean("exchange_min")))
    base = rows[0][2]
    print(f"{'ranks':>5} {'baseline s':>10} {'analysis s':>10} {'speed-up':>8} {'exchange s':>10} {'full d20 set, est. s':>20}  "
          f"SVD+metrics CPU s per rank")
    for n, first, wall, plans, exch in rows:
        print(f"{n:>5} {first:>10.2f} {wall:>10.2f} {base / wall:>7.2f}x {exch:>10.3f} {wall * 20 / cfg.blocks:>20.1f}  "
              + " ".join(f"{p:.2f}" for p in plans))
    print(f"(analysis s: wall time of one analysis, mean over analyses 2..{cfg.analyses}; exchange: communication only "
          f"(the last rank to finish its SVDs); CPU s: the rank's own compute, which shows how evenly the work is split "
          f"whatever else runs on the machine; load average {os.getloadavg()[0]:.2f} at the end)")


if __name__ == "__main__":
    run_cli(main)
