"""A short check before a long GPU job: does this code work on this node, and how fast is it?

    python -m scripts.gpu_check                               # any CUDA machine, about 5-10 minutes
    sbatch slurm/gpu_check.sbatch                             # the same on one GPU of the cluster
    python -m scripts.gpu_check --tiny=true --device_type=cpu # every check at toy sizes (the test suite runs it)

Four checks, one table, exit status 1 when any check fails:
  phase1    the researcher's Phase 1 command on this device (d4, 100 steps), its checklist read from the
            run's files (and the guide's console lines), then the guide's generation snippet on the
            checkpoint it wrote
  svd       exact vs certified warm SVD on d20 shapes (1280x1280, 5120x1280): time, captured energy, same k
  d20       ~30 steps of d20 (seq 2048, device batch 32) as the baseline and as adaptive SVD on every matrix
            with an analysis every 10 steps: MFU, tok/s, analysis time and share, compiled graphs (a switch
            must add none), peak memory
  bf16      the protected mode's exactness under bf16 autocast on this device: after 50 Muon steps the
            protected triples are still singular triples of W (<= 1e-5 relative)
Needs the data and the tokenizer (`bash slurm/prepare_login_node.sh` on a login node). The expected
numbers and where to record measured rows: experiments/CLUSTER_GUIDE.md, "GPU check".
"""

import contextlib
import dataclasses
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch._dynamo

from nanochat.adaptive_cycle import AdaptiveConfig, AdaptiveSVDHook
from nanochat.checkpoint_manager import CHECKPOINT_NAME, checkpoint_dir
from nanochat.cli import Check, at_least, flag, one_of, parse_args
from nanochat.common import DEVICE_TYPES, check_device_type, device_peak_flops, peak_memory_mib, run_cli
from nanochat.gpt import GPT, AdaptiveSVDLinear, GPTConfig
from nanochat.optim import Muon
from nanochat.runs import analysis_seconds, evaluations, read_jsonl, svd_records, svd_summary
from nanochat.synthetic import bench_shape, planted
from nanochat.tokenizer import get_tokenizer
from nanochat.train import TRAIN_METRICS, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SNIPPET = os.path.join(ROOT, "experiments", "guide_snippet.py")
PHASE1_STEPS, PHASE1_TINY_STEPS = 100, 40  # the guide's horizon; the tiny one still has analyses at 20 and 40
PHASE1 = ["--depth=4", "--max_seq_len=512", "--device_batch_size=1", "--eval_tokens=512", "--core_metric_every=-1",
          "--total_batch_size=512", f"--num_iterations={PHASE1_STEPS}"]
PHASE1_TINY = ["--depth=4", "--max_seq_len=64", "--device_batch_size=1", "--eval_tokens=64", "--core_metric_every=-1",
               "--total_batch_size=64", f"--num_iterations={PHASE1_TINY_STEPS}"]


CHECK_NAMES = ("phase1", "svd", "d20", "bf16")


def check_names(text):
    return [c.strip() for c in text.split(",") if c.strip()]


@dataclasses.dataclass
class CheckConfig:
    device_type: str = flag("cuda", "device to check: cuda | cpu | mps", one_of(*DEVICE_TYPES))
    tiny: bool = flag(False, "toy sizes everywhere (a CPU test of this script), not a measurement")
    depth: int = flag(20, "depth of the step check (tiny: 2)", at_least(1))
    max_seq_len: int = flag(2048, "sequence length of the step check (tiny: 64)", at_least(2))
    device_batch_size: int = flag(32, "sequences per forward of the step check (tiny: 2); 16 for 40 GB A100s", at_least(1))
    steps: int = flag(30, "steps per run of the step check (tiny: 8)", at_least(1))
    svd_interval: int = flag(10, "analysis interval of the adaptive step run (tiny: 4)", at_least(1))
    only: str = flag("", "comma list of checks to run; empty = all",
                     Check(lambda v: all(c in CHECK_NAMES for c in check_names(v)), f"empty or a comma list of {', '.join(CHECK_NAMES)}"))
    out: str = flag("", "folder for the runs (kept); empty = a temporary folder, removed at the end")


def row(check, ok, result, details):
    return {"check": check, "ok": ok, "result": result, "details": details}


# -- phase1 ----------------------------------------------------------------------------------------

def switch_count(records):
    """Switches (either way) in a run's svd_metrics.jsonl records."""
    svd = svd_summary(records)
    return svd["to_lowrank"] + svd["to_full"] if svd else 0


def check_phase1(cfg, out):
    """The guide's command (device swapped), the checklist from the run's files and the guide's console
    lines, then the snippet."""
    run_dir = os.path.join(out, "phase1")
    os.makedirs(run_dir, exist_ok=True)
    flags = (PHASE1_TINY if cfg.tiny else PHASE1) + [f"--device_type={cfg.device_type}"]
    cmd = [sys.executable, "-m", "scripts.base_train_adaptive_svd", *flags]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.time()
    r = subprocess.run(cmd, cwd=run_dir, env=env, capture_output=True, text=True)
    seconds = time.time() - t0
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        return row("phase1", False, f"exit {r.returncode}", last)
    out_text = r.stdout
    ckpt_dir = checkpoint_dir(run_dir, "d4")
    records = svd_records(ckpt_dir)
    steps = sorted({rec["step"] for rec in records})
    expected = list(range(20, (PHASE1_TINY_STEPS if cfg.tiny else PHASE1_STEPS) + 1, 20))  # --svd_interval's default
    first = {rec["reason"] for rec in records if rec["step"] == expected[0]}
    vals = [v for _, v in evaluations(read_jsonl(os.path.join(ckpt_dir, TRAIN_METRICS)))]
    checklist = {
        "analyses at " + ",".join(map(str, expected)): steps == expected,
        # the guide's console line, and in the records every layer's first analysis taking its baseline
        "initial SVD at 20": "Initial SVD computed" in out_text and first == {"initial_svd_baseline"},
        "metrics printed": "alignment_ratio=" in out_text and "subspace_angle=" in out_text,
        "val bpb fell": len(vals) >= 2 and vals[-1] < vals[0],
        "checkpoint saved": os.path.exists(os.path.join(ckpt_dir, CHECKPOINT_NAME)),
    }
    snippet = subprocess.run([sys.executable, "-c", open(SNIPPET).read()], cwd=run_dir, env=env, capture_output=True,
                             text=True)
    checklist["snippet generates"] = snippet.returncode == 0 and snippet.stdout.startswith("<|bos|>")
    switches = switch_count(records)
    failed = [k for k, v in checklist.items() if not v]
    details = (f"{seconds:.0f} s; {len(steps)} analyses, {switches} switches (a switch needs learned directions: "
               f"none is not a failure), val bpb {vals[0]:.3f} -> {vals[-1]:.3f}" if vals else f"{seconds:.0f} s")
    return row("phase1", not failed, "ok" if not failed else "FAILED: " + "; ".join(failed), details)


# -- svd ---------------------------------------------------------------------------------------------

def check_svd(cfg, device):
    shapes = ((256, 256), (1024, 256)) if cfg.tiny else ((1280, 1280), (5120, 1280))
    rows = []
    for n_out, n_in in shapes:
        r = bench_shape(n_out, n_in, 1e-2, 2 if cfg.tiny else 3, 16 if cfg.tiny else 64, 0, device)
        ok = r["same_k"] and r["captured_min"] >= 0.999
        rows.append(row(f"svd {n_out}x{n_in}", ok, f"exact {r['exact_s'] * 1e3:.1f} ms, warm {r['warm_s'] * 1e3:.1f} ms",
                        f"speed-up {r['exact_s'] / r['warm_s']:.1f}x, k {r['k']}, captured >= {r['captured_min']:.5f}, "
                        f"warm accepted {r['accepted']}/{r['analyses']}, same k {r['same_k']}"))
    return rows


# -- d20 steps ---------------------------------------------------------------------------------------

def step_run(cfg, out, adaptive):
    """One short run through the real loop; its numbers from the per-step and analysis files."""
    depth, seq, batch = (2, 64, 2) if cfg.tiny else (cfg.depth, cfg.max_seq_len, cfg.device_batch_size)
    steps, interval = (8, 4) if cfg.tiny else (cfg.steps, cfg.svd_interval)
    tag = "adaptive" if adaptive else "baseline"
    run_cfg = AdaptiveConfig(depth=depth, max_seq_len=seq, device_batch_size=batch, total_batch_size=batch * seq,
                             num_iterations=steps, eval_every=-1, eval_tokens=batch * seq, sample_every=-1,
                             device_type=cfg.device_type, output_dir=out, model_tag=tag, overwrite=True,
                             adaptive_svd=adaptive, adaptive_svd_target_layer=-1, svd_targets="all", svd_interval=interval)
    if cfg.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            result = train(run_cfg, hook=AdaptiveSVDHook(run_cfg) if adaptive else None)
    except torch.OutOfMemoryError:
        return None, f"out of memory at device batch {batch}: try --device_batch_size={max(1, batch // 2)}"
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    folder = result["ckpt_dir"]
    rows = read_jsonl(os.path.join(folder, TRAIN_METRICS))
    median_dt = statistics.median(r["dt"] for r in rows[2:] or rows)  # the first steps compile and warm up
    records = svd_records(folder) if adaptive else []
    with torch.device("meta"):  # only for its FLOPs per token
        model = GPT(GPTConfig.from_depth(depth, get_tokenizer().get_vocab_size(), seq))
    return {"median_dt": median_dt, "tok_per_sec": batch * seq / median_dt, "flops_per_token": model.estimate_flops(),
            "tokens_per_step": batch * seq, "total_time": result["total_time"], "analysis_s": analysis_seconds(records),
            "analyses": len({r["step"] for r in records}), "switches": switch_count(records), "graphs": graphs,
            "peak_mib": peak_memory_mib(cfg.device_type), "losses_finite": all(map(math.isfinite, result["losses"]))}, None


def check_d20(cfg, out, device):
    peak = device_peak_flops(device)
    results, rows = {}, []
    for adaptive in (False, True):
        name = "d20 adaptive" if adaptive else "d20 baseline"
        res, error = step_run(cfg, out, adaptive)
        if error:
            rows.append(row(name, False, "FAILED", error))
            continue
        results[adaptive] = res
        mfu = f"{100 * res['flops_per_token'] * res['tok_per_sec'] / peak:.1f}%" if peak else "n/a (unknown peak)"
        details = f"median step {res['median_dt'] * 1e3:.0f} ms, MFU {mfu}, peak memory {res['peak_mib']:,.0f} MiB, " \
                  f"{res['graphs']} compiled graphs"
        if adaptive:
            share = res["analysis_s"] / res["total_time"] if res["total_time"] else float("nan")
            details += (f", {res['analyses']} analyses {res['analysis_s']:.1f} s = {100 * share:.1f}% of step time, "
                        f"{res['switches']} switches")
        ok = res["losses_finite"]
        if adaptive and False in results:
            extra = res["graphs"] - results[False]["graphs"]
            details += f", recompiles vs baseline {extra}"
            ok = ok and extra == 0
        rows.append(row(name, ok, f"{res['tok_per_sec']:,.0f} tok/s", details))
    return rows


# -- bf16 exactness ----------------------------------------------------------------------------------

def check_bf16(cfg, device):
    """Forward and backward under bf16 autocast, Muon in its bf16 path, 50 steps on a protected layer."""
    n, k = (128, 8) if cfg.tiny else (1280, 64)
    W, _, _ = planted(n, n, k, seed=0)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U, S, V = U[:, :k].to(device), S[:k].to(device), Vh[:k].T.to(device)
    layer = AdaptiveSVDLinear(n, n, device=device)
    with torch.no_grad():
        layer.weight.copy_(W.to(device))
    layer.protect(U, V)
    muon = Muon([("w", layer.weight)], lr=0.02, layers={layer.weight: layer})
    gen = torch.Generator().manual_seed(0)
    worst_update = 0.0
    for _ in range(50):
        x = torch.randn(64, n, generator=gen).to(device)
        target = torch.randn(64, n, generator=gen).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            loss = (layer(x).float() - target).square().mean()
        loss.backward()
        before = layer.weight.detach().clone()
        muon.step()
        layer.weight.grad = None
        dW = layer.weight.detach() - before
        worst_update = max(worst_update, float((U.T @ dW).norm() / dW.norm()))
    Wf = layer.weight.detach().float()
    drift = max(float((Wf @ V - U * S).norm() / S.norm()), float((U.T @ Wf - S[:, None] * V.T).norm() / S.norm()))
    ok = drift <= 1e-5 and worst_update <= 1e-5
    return [row("bf16 protected", ok, f"triples drift {drift:.1e}", f"{n}x{n}, k {k}, 50 steps under bf16 autocast; "
                f"largest principal share of an update {worst_update:.1e} (both must be <= 1e-5)")]


def main(argv):
    cfg = parse_args(CheckConfig, argv, "python -m scripts.gpu_check", __doc__)
    device_type = check_device_type(cfg.device_type)
    device = torch.device(device_type)
    wanted = check_names(cfg.only) or list(CHECK_NAMES)
    if not cfg.tiny and device_type != "cuda":
        print(f"note: full-size checks on {device_type} take far longer than on a GPU; --tiny=true is the quick test")
    name = torch.cuda.get_device_name(device) if device_type == "cuda" else device_type
    print(f"GPU check on {name}, torch {torch.__version__}, {'tiny sizes' if cfg.tiny else 'full sizes'}", flush=True)
    with contextlib.ExitStack() as stack:
        out = cfg.out or stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_"))
        rows = []
        for check in wanted:
            t0 = time.time()
            print(f"running {check} ...", flush=True)
            if check == "phase1":
                rows.append(check_phase1(cfg, out))
            elif check == "svd":
                rows += check_svd(cfg, device)
            elif check == "d20":
                rows += check_d20(cfg, out, device)
            else:
                rows += check_bf16(cfg, device)
            print(f"  {check} took {time.time() - t0:.0f} s", flush=True)
    width = max(len(r["check"]) for r in rows)
    print(f"\n| {'check':<{width}} | pass | result | details |\n|{'-' * (width + 2)}|------|--------|---------|")
    for r in rows:
        print(f"| {r['check']:<{width}} | {'yes' if r['ok'] else 'NO'}  | {r['result']} | {r['details']} |")
    print("GPU CHECK " + json.dumps({"passed": all(r["ok"] for r in rows), "rows": rows}))
    if not all(r["ok"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    run_cli(main)
