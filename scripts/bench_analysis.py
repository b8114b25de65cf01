"""Benchmark: one adaptive-SVD analysis of d20's 120 matrices in one process, and where its time goes.

    python -m scripts.bench_analysis                          # the whole d20 set (20 blocks), CPU, one thread
    python -m scripts.bench_analysis --blocks=2 --analyses=3  # a quicker look at the same shapes
    python -m scripts.bench_analysis --device=cuda            # the same on a GPU

A d20 block has six analysed matrices: c_q, c_k, c_v, attn.c_proj (1280x1280), mlp.c_fc (5120x1280) and
mlp.c_proj (1280x5120). Each gets a trained-looking spectrum (a Gaussian bulk with the init std plus
--spikes learned directions from 4x down to 1x the bulk edge) and a random gradient; between analyses
every matrix drifts by --rel of its norm (half along its learned directions, half random). The analyses
run through the real hook (nanochat.adaptive_cycle.AdaptiveSVDHook, --svd_targets=all on every block,
--svd_method as in a run) with --svd_policy=observe, so nothing switches and every analysis does the
same kind of work. The first analysis has no previous basis; the later ones start from it. --batched
picks the batched analysis (what a GPU run does) or one layer at a time (what a CPU run does).

Reported per analysis, from the records the hook writes (svd_metrics.jsonl): wall and CPU time; the
split into SVD (the SVD, the count of learned directions and the warm certificate), metrics, decision
and the rest (exchange, apply, logging, the loop); and the host syncs (nanochat.host_sync: calls that
would make a GPU's host wait) per analysis and per matrix. Prints the load average: on a shared
machine the wall time drifts, the CPU time of one thread much less.
"""

import contextlib
import io
import os
import tempfile
import time
from dataclasses import dataclass

import torch

from nanochat.adaptive_cycle import SVD_METRICS, AdaptiveConfig, AdaptiveSVDHook
from nanochat.cli import Check, above, at_least, flag, one_of, parse_args
from nanochat.common import UserError, run_cli
from nanochat.gpt import GPT, GPTConfig
from nanochat.hooks import Run
from nanochat.runs import read_jsonl
from nanochat.synthetic import trained_matrix

STAGES = ("svd", "metrics", "decision")


@dataclass
class BenchConfig:
    blocks: int = flag(20, "d20 blocks whose six matrices are analysed (20 = all 120)", at_least(1))
    analyses: int = flag(3, "analyses (the first has no previous basis)", at_least(1))
    svd_method: str = flag("auto", "exact | warm | auto, as --svd_method of the training script",
                           one_of("exact", "warm", "auto"))
    spikes: int = flag(16, "learned directions planted in every matrix", at_least(0))
    rel: float = flag(1e-2, "relative Frobenius size of each matrix's drift between analyses", above(0))
    model_dim: int = flag(1280, "model width (1280 = d20); heads of 128", Check(lambda v: v >= 128 and v % 128 == 0,
                                                                             "a multiple of 128"))
    device: str = flag("cpu", "cpu | cuda", one_of("cpu", "cuda"))
    threads: int = flag(1, "torch threads on CPU", at_least(1))
    count_syncs: bool = flag(True, "count host syncs (every torch call then passes a Python check: a little slower)")
    batched: bool | None = flag(None, "the batched analysis (true), one layer at a time (false), or as a run on this "
                                      "device does (auto: batched except on CPU)")


def build(cfg, device):
    """The hook on a d20-shaped model whose target matrices look trained; returns (hook, modules)."""
    d = cfg.model_dim
    with torch.device("meta"):
        model = GPT(GPTConfig(sequence_len=64, vocab_size=256, n_layer=cfg.blocks, n_head=d // 128, n_kv_head=d // 128,
                              n_embd=d))
    model.to_empty(device=device)
    acfg = AdaptiveConfig(depth=cfg.blocks, adaptive_svd_target_layer=-1, svd_targets="all", svd_method=cfg.svd_method,
                          svd_interval=1, svd_policy="observe", device_type=device.type)
    hook = AdaptiveSVDHook(acfg)
    hook.prepare_model(model)
    hook.count_syncs = cfg.count_syncs
    hook.batched = device.type != "cpu" if cfg.batched is None else cfg.batched
    gen = torch.Generator().manual_seed(0)
    spikes = {}
    with torch.no_grad():
        for name, layer in hook.layers.items():
            W, U_s = trained_matrix(*layer.module.weight.shape, cfg.spikes, gen, device)
            layer.module.weight.copy_(W)
            spikes[name] = U_s
    return acfg, model, hook, spikes


def drift(hook, spikes, rel, seed):
    """Every matrix moves by rel * ||W|| (half along its learned directions) and gets a random gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in hook.layers.items():
            W = layer.module.weight
            U_s = spikes[name]
            along = U_s @ torch.randn(U_s.shape[1], W.shape[1], generator=gen).to(W.device)
            noise = torch.randn(W.shape, generator=gen).to(W.device)
            step = along / along.norm() + noise / noise.norm()
            W.add_(step, alpha=rel * float(W.norm()) / float(step.norm()))
            W.grad = torch.randn(W.shape, generator=gen).to(W.device)


def main(argv):
    cfg = parse_args(BenchConfig, argv, prog="python -m scripts.bench_analysis", description=__doc__)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device=cuda but no CUDA device is available here; use --device=cpu")
    device = torch.device(cfg.device)
    torch.set_num_threads(cfg.threads)
    with contextlib.redirect_stdout(io.StringIO()):
        acfg, model, hook, spikes = build(cfg, device)
    n = len(hook.layers)
    print(f"{n} matrices ({cfg.blocks} d20 block(s)), --svd_method={cfg.svd_method}, {cfg.spikes} learned directions each, "
          f"{'batched' if hook.batched else 'one layer at a time'}, "
          f"drift {cfg.rel:g} between analyses, {device}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
          f"load average {os.getloadavg()[0]:.2f} at start", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_analysis_") as out:
        hook.attach(Run(acfg, model, None, None, device, out, lambda data, step: None, 0, 1))
        cpu = {}
        for step in range(1, cfg.analyses + 1):
            drift(hook, spikes, cfg.rel, seed=step)
            c0 = time.process_time()
            with contextlib.redirect_stdout(io.StringIO()):  # the hook's console lines
                hook.analyze(step)
            cpu[step] = time.process_time() - c0
        hook.metrics_log.close()
        records = read_jsonl(os.path.join(out, SVD_METRICS))
    print(f"{'analysis':>8} {'wall s':>8} {'CPU s':>7} " + " ".join(f"{s + ' s':>10}" for s in STAGES)
          + f" {'rest s':>7} {'SVD share':>9} {'host syncs':>10} {'per matrix':>10}")
    for step in range(1, cfg.analyses + 1):
        rows = [r for r in records if r["step"] == step]
        wall = rows[0]["analysis_seconds"]
        stages = {s: sum(r.get(f"{s}_seconds", 0.0) for r in rows) for s in STAGES}
        rest = wall - sum(stages.values())
        syncs = rows[0].get("host_syncs")
        print(f"{step:>8} {wall:>8.2f} {cpu[step]:>7.2f} " + " ".join(f"{stages[s]:>10.2f}" for s in STAGES)
              + f" {rest:>7.2f} {100 * stages['svd'] / wall:>8.1f}%"
              + (f" {syncs:>10} {syncs / n:>10.1f}" if syncs is not None else f" {'-':>10} {'-':>10}"), flush=True)
    methods = {}
    for r in records:
        methods[r.get("svd_method")] = methods.get(r.get("svd_method"), 0) + 1
    print(f"SVDs by method over all analyses: {methods}; load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    run_cli(main)
