"""A short check before a long GPU job: does this code work on this node, and how fast is it?

    python -m scripts.gpu_check                               # any CUDA machine, about 5-10 minutes
    sbatch slurm/gpu_check.sbatch                             # the same on one GPU of the cluster
    python -m scripts.gpu_check --tiny=true --device_type=cpu # every check at toy sizes (the test suite runs it)

Four checks, one table, exit status 1 when any check fails:
  phase1    the researcher's Phase 1 command on this device (d4, 100 steps), its checklist read from the
            run's files (and the guide's console lines), then the guide's generation snippet on the
            checkpoint it wrote
  svd       exact vs certified warm SVD on d20 shapes (1280x1280, 5120x1280): time, captured energy, same k
  d20       40 steps of d20 (seq 2048, device batch 32) as the baseline and as adaptive SVD on every matrix
            with an analysis every 10 and every 20 steps, two runs of each in turn: MFU, tok/s, compiled graphs
            (a switch must add none), peak memory; where an analysis' time goes (SVD, metrics, decision,
            exchange between ranks = communication, apply, host syncs); the wall-clock ratio adaptive/baseline
            at both intervals, pooled over the two runs, which must be <= 1.02 at 20 (at --tiny sizes it is
            reported, not checked: a toy step is tiny next to an analysis, so the ratio measures nothing)
  bf16      the protected mode's exactness under bf16 autocast, with fp32 matmuls allowed to run as TF32 as in
            training: after 50 Muon steps the protected triples are still singular triples of W (<= 1e-5
            relative) and no update has a principal share above 1e-5
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
TINY_STEPS = 8  # the d20 check's runs at toy sizes
PHASE1 = ["--depth=4", "--max_seq_len=512", "--device_batch_size=1", "--eval_tokens=512", "--core_metric_every=-1",
          "--total_batch_size=512", f"--num_iterations={PHASE1_STEPS}"]
PHASE1_TINY = ["--depth=4", "--max_seq_len=64", "--device_batch_size=1", "--eval_tokens=64", "--core_metric_every=-1",
               "--total_batch_size=64", f"--num_iterations={PHASE1_TINY_STEPS}"]


CHECK_NAMES = ("phase1", "svd", "d20", "bf16")
INTERVALS, TINY_INTERVALS = (10, 20), (2, 4)  # the adaptive runs' analysis intervals; the ratio at the last must pass
RATIO_LIMIT = 1.02  # adaptive/baseline wall clock at the longer interval (the guide's Phase 3 runs at 20 or more)
ROUNDS = 2  # short runs of each kind (baseline, each interval), taken in turn
STAGES = ("svd", "metrics", "decision", "exchange", "apply")  # an analysis' stages, as the hook records them


def check_names(text):
    return [c.strip() for c in text.split(",") if c.strip()]


@dataclasses.dataclass
class CheckConfig:
    device_type: str = flag("cuda", "device to check: cuda | cpu | mps", one_of(*DEVICE_TYPES))
    tiny: bool = flag(False, "toy sizes everywhere (a CPU test of this script), not a measurement")
    depth: int = flag(20, "depth of the step check (tiny: 2)", at_least(1))
    max_seq_len: int = flag(2048, "sequence length of the step check (tiny: 64)", at_least(2))
    device_batch_size: int = flag(32, "sequences per forward of the step check (tiny: 2); 16 for 40 GB A100s", at_least(1))
    steps: int = flag(40, "steps per run of the step check (tiny: 8): whole analysis intervals of both adaptive runs "
                          "after their first analysis", Check(lambda v: v >= 2 * INTERVALS[-1] and v % INTERVALS[-1] == 0,
                                                             f"a multiple of {INTERVALS[-1]}, at least {2 * INTERVALS[-1]}"))
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



def step_run(cfg, out, interval=None, count_syncs=False):
    """One short run through the real loop (the baseline when `interval` is None, else adaptive SVD on every
    matrix, analysing every `interval` steps); its numbers from the per-step and analysis files."""
    depth, seq, batch = (2, 64, 2) if cfg.tiny else (cfg.depth, cfg.max_seq_len, cfg.device_batch_size)
    steps = TINY_STEPS if cfg.tiny else cfg.steps
    adaptive = interval is not None
    tag = f"adaptive{interval}" if adaptive else "baseline"
    run_cfg = AdaptiveConfig(depth=depth, max_seq_len=seq, device_batch_size=batch, total_batch_size=batch * seq,
                             num_iterations=steps, eval_every=-1, eval_tokens=batch * seq, sample_every=-1,
                             device_type=cfg.device_type, output_dir=out, model_tag=tag, overwrite=True,
                             adaptive_svd=adaptive, adaptive_svd_target_layer=-1, svd_targets="all",
                             **({"svd_interval": interval} if adaptive else {}))
    hook = AdaptiveSVDHook(run_cfg) if adaptive else None
    if hook:
        hook.count_syncs = count_syncs
    if cfg.device_type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            result = train(run_cfg, hook=hook)
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
            "dt": {r["step"]: r["dt"] for r in rows}, "total_time": result["total_time"], "records": records,
            "analysis_s": analysis_seconds(records), "analyses": len({r["step"] for r in records}),
            "switches": switch_count(records), "graphs": graphs, "peak_mib": peak_memory_mib(cfg.device_type),
            "losses_finite": all(map(math.isfinite, result["losses"]))}, None


def wall_clock_ratio(adaptive, baseline, interval, steps):
    """(ratio, first step, last step, each round's ratio): the adaptive runs' summed step times over the whole
    intervals after their first analysis (so the window holds plain steps, protected steps and analyses in a
    long run's proportion, and neither compilation nor the first analysis, which has no previous basis), over
    the baseline runs' same steps, pooled over the rounds (lists of runs, one per round)."""
    window = range(interval + 1, steps + 1)
    time = lambda run: sum(run["dt"][s] for s in window)
    each = [time(a) / time(b) for a, b in zip(adaptive, baseline)]
    return sum(map(time, adaptive)) / sum(map(time, baseline)), window[0], window[-1], each


def analysis_split(records):
    """An analysis' time by stage (means over the analyses after the first), from the hook's records.
    Returns a dict of seconds (stages, 'other' = the rest of the wall time, 'total'), the host syncs per
    analysis and the seconds blocked in them (None when not counted), the matrices per analysis and the
    first analysis' time."""
    by_step = {}
    for r in records:
        by_step.setdefault(r["step"], []).append(r)
    steps = sorted(by_step)
    later = steps[1:] or steps
    mean = lambda f: sum(f(by_step[s]) for s in later) / len(later)
    split = {stage: mean(lambda rows: sum(r.get(f"{stage}_seconds") or 0.0 for r in rows)) for stage in STAGES[:3]}
    split.update({stage: mean(lambda rows: rows[0].get(f"{stage}_seconds") or 0.0) for stage in STAGES[3:]})
    split["total"] = mean(lambda rows: rows[0]["analysis_seconds"])
    split["other"] = split["total"] - sum(split[stage] for stage in STAGES)
    counted = all("host_syncs" in by_step[s][0] for s in later)
    syncs = mean(lambda rows: rows[0]["host_syncs"]) if counted else None
    blocked = mean(lambda rows: rows[0]["host_sync_seconds"]) if counted else None
    return {"seconds": split, "syncs": syncs, "sync_seconds": blocked, "matrices": len(by_step[steps[0]]),
            "first_s": by_step[steps[0]][0]["analysis_seconds"]}


def split_row(split):
    sec = split["seconds"]
    total = sec["total"] or float("nan")
    parts = ", ".join(f"{name} {sec[name]:.3f} s ({100 * sec[name] / total:.0f}%)" for name in STAGES + ("other",))
    syncs = ("host syncs not counted" if split["syncs"] is None else
             f"{split['syncs']:,.0f} host syncs per analysis ({split['syncs'] / split['matrices']:.1f} per matrix), "
             f"{split['sync_seconds']:.3f} s blocked in them (within the stages above)")
    return row("d20 analysis split", True, f"{sec['total']:.3f} s per analysis",
               f"{split['matrices']} matrices; {parts}; {syncs}; the first analysis (no previous basis) "
               f"{split['first_s']:.3f} s; exchange is communication between ranks (none on one GPU)")


def ratio_row(ratios, tiny):
    """The wall-clock ratios {interval: (ratio, first, last)}; fails when the longest interval's is above the
    limit (not at toy sizes, where an analysis is large next to a toy step)."""
    last = max(ratios)
    ratio = ratios[last][0]
    ok = tiny or ratio <= RATIO_LIMIT
    result = ", ".join(f"{ratios[i][0]:.3f} at interval {i}" for i in sorted(ratios, reverse=True))
    windows = "; ".join(f"interval {i}: steps {first}-{end_}, rounds {' '.join(f'{r:.3f}' for r in each)}"
                        for i, (_, first, end_, each) in sorted(ratios.items()))
    details = (f"adaptive/baseline summed step time over whole intervals after the first analysis, pooled over "
               f"{ROUNDS} runs of each ({windows}); "
               f"must be <= {RATIO_LIMIT} at interval {last}" + (" (not checked at toy sizes)" if tiny else "")
               + f"; the interval-{min(ratios)} run counts host syncs, which makes it a little slower")
    return row("d20 wall-clock ratio", ok, result, details)


def check_d20(cfg, out, device):
    """The baseline and the adaptive runs, ROUNDS times in turn (so that a slow spell of the machine hits
    both); a row per run kind from its first round, the analysis split, and the wall-clock ratios pooled
    over the rounds."""
    peak = device_peak_flops(device)
    intervals = TINY_INTERVALS if cfg.tiny else INTERVALS
    steps = TINY_STEPS if cfg.tiny else cfg.steps
    runs = {}  # interval (None: baseline) -> its rounds
    for round_ in range(ROUNDS):
        for interval in (None,) + intervals:
            name = f"d20 adaptive, interval {interval}" if interval else "d20 baseline"
            res, error = step_run(cfg, out, interval, count_syncs=round_ == 0 and interval == intervals[0])
            if error:
                return [row(name, False, "FAILED", error)]
            runs.setdefault(interval, []).append(res)
    baseline = runs[None][0]
    rows, ratios = [], {}
    for interval in (None,) + intervals:
        res = runs[interval][0]
        name = f"d20 adaptive, interval {interval}" if interval else "d20 baseline"
        mfu = f"{100 * res['flops_per_token'] * res['tok_per_sec'] / peak:.1f}%" if peak else "n/a (unknown peak)"
        details = f"median step {res['median_dt'] * 1e3:.0f} ms, MFU {mfu}, peak memory {res['peak_mib']:,.0f} MiB, " \
                  f"{res['graphs']} compiled graphs"
        ok = all(r["losses_finite"] for r in runs[interval])
        if interval:
            share = res["analysis_s"] / res["total_time"] if res["total_time"] else float("nan")
            extra = max(r["graphs"] for r in runs[interval]) - baseline["graphs"]
            details += (f", {res['analyses']} analyses {res['analysis_s']:.1f} s = {100 * share:.1f}% of step time, "
                        f"{res['switches']} switches, recompiles vs baseline {extra}")
            ok = ok and extra == 0
            ratios[interval] = wall_clock_ratio(runs[interval], runs[None], interval, steps)
        rows.append(row(name, ok, f"{res['tok_per_sec']:,.0f} tok/s", details + " (first round)"))
        if interval == intervals[0]:
            rows.append(split_row(analysis_split(res["records"])))
    rows.append(ratio_row(ratios, cfg.tiny))
    return rows


# -- bf16 exactness ----------------------------------------------------------------------------------

def check_bf16(cfg, device):
    """Forward and backward under bf16 autocast, Muon in its bf16 path, fp32 matmuls allowed to run as TF32 (as
    compute_init sets them for training), 50 steps on a protected layer; measured in fp64."""
    n, k = (128, 8) if cfg.tiny else (1280, 64)
    W, _, _ = planted(n, n, k, seed=0)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U, S, V = U[:, :k].to(device), S[:k].to(device), Vh[:k].T.to(device)
    U64, S64, V64 = U.double(), S.double(), V.double()
    layer = AdaptiveSVDLinear(n, n, device=device)
    with torch.no_grad():
        layer.weight.copy_(W.to(device))
    layer.protect(U, V)
    muon = Muon([("w", layer.weight)], lr=0.02, layers={layer.weight: layer})
    gen = torch.Generator().manual_seed(0)
    worst_update = 0.0
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        for _ in range(50):
            x = torch.randn(64, n, generator=gen).to(device)
            target = torch.randn(64, n, generator=gen).to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
                loss = (layer(x).float() - target).square().mean()
            loss.backward()
            before = layer.weight.detach().clone()
            muon.step()
            layer.weight.grad = None
            dW = (layer.weight.detach() - before).double()
            worst_update = max(worst_update, float((U64.T @ dW).norm() / dW.norm()))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    Wf = layer.weight.detach().double()
    drift = max(float((Wf @ V64 - U64 * S64).norm() / S64.norm()),
                float((U64.T @ Wf - S64[:, None] * V64.T).norm() / S64.norm()))
    ok = drift <= 1e-5 and worst_update <= 1e-5
    return [row("bf16 protected", ok, f"triples drift {drift:.1e}", f"{n}x{n}, k {k}, 50 steps under bf16 autocast with TF32 "
                f"allowed; largest principal share of an update {worst_update:.1e} (both must be <= 1e-5)")]


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
