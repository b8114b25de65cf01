"""fp32 vs bf16: the same run in both matmul dtypes, and how far bf16's loss curve and val bpb drift.

    python -m scripts.compare_dtypes --out=/tmp/dtypes -- --depth=4 --max_seq_len=512 --device_batch_size=1 \\
        --eval_tokens=512 --core_metric_every=-1 --total_batch_size=512 --num_iterations=100 --device_type=cpu

Runs `python -m scripts.base_train_adaptive_svd <flags> --dtype=D` for D = float32, then bfloat16, each
in its own process into <out>/base_checkpoints/<D>/ with its console log (train.log); a finished run is
reused (--force repeats it). Then, from the two logs: at every step after --after, the relative
difference of the console's loss (the debiased EMA), |bf16 - fp32| / fp32; and of the final val bpb.
Prints both, and PASS or FAIL against --max_loss_diff and --max_bpb_diff (exit status 1 on FAIL).
"""

import dataclasses
import os
import subprocess
import sys

from nanochat.checkpoint_manager import checkpoint_dir
from nanochat.cli import flag, parse_args, passthrough, required
from nanochat.common import UserError, run_cli
from scripts.run_logs import find_log, parse_log

DTYPES = ("float32", "bfloat16")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(run_dir, train_argv):
    """One training process, its console in <run_dir>/train.log and its command in command.txt."""
    os.makedirs(run_dir, exist_ok=True)
    cmd = [sys.executable, "-m", "scripts.base_train_adaptive_svd", *train_argv]
    with open(os.path.join(run_dir, "command.txt"), "w") as f:
        f.write(" ".join(["python"] + cmd[1:]) + "\n")
    print(f"running: {' '.join(['python'] + cmd[1:])}", flush=True)
    with open(os.path.join(run_dir, "train.log"), "w") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc != 0:
        raise UserError(f"the run failed with exit status {rc}; see {os.path.join(run_dir, 'train.log')}")


def compare(fp32_log, bf16_log, after):
    """{'loss_diffs': {step: relative difference}, 'bpb': (fp32, bf16), 'bpb_diff': relative difference}."""
    a, b = parse_log(fp32_log), parse_log(bf16_log)
    if not a["steps"] or not b["steps"] or not a["val_bpb"] or not b["val_bpb"]:
        raise UserError(f"no step lines or no validation bpb in {fp32_log} or {bf16_log}; did both runs finish?")
    if a["steps"] != b["steps"]:
        raise UserError("the two runs logged different steps; compare runs of the same flags")
    diffs = {s: abs(lb - la) / abs(la) for s, la, lb in zip(a["steps"], a["loss"], b["loss"]) if s > after}
    bpb = (a["val_bpb"][-1], b["val_bpb"][-1])
    return {"loss_diffs": diffs, "bpb": bpb, "bpb_diff": abs(bpb[1] - bpb[0]) / bpb[0]}


@dataclasses.dataclass
class CompareDtypesConfig:
    out: str = required("output dir of the two runs")
    after: int = flag(10, "compare the loss at every step after this one")
    max_loss_diff: float = flag(0.02, "largest allowed relative loss difference")
    max_bpb_diff: float = flag(0.01, "largest allowed relative final val bpb difference")
    force: bool = flag(False, "repeat runs that already finished")
    train_flags: list[str] = passthrough("flags of scripts.base_train_adaptive_svd, the same for both runs")


def parse(argv):
    args = parse_args(CompareDtypesConfig, argv, prog="python -m scripts.compare_dtypes", description=__doc__)
    for key in ("dtype", "model_tag", "output_dir", "resume", "overwrite"):
        if any(a.lstrip("-").replace("-", "_").split("=")[0] == key for a in args.train_flags):
            raise UserError(f"--{key} is set by the comparison runner itself; leave it out of the training flags")
    return args, args.train_flags


def main(argv):
    args, train_argv = parse(argv)
    out = os.path.abspath(args.out)
    logs = {}
    for dtype in DTYPES:
        run_dir = checkpoint_dir(out, dtype)
        logs[dtype] = find_log(run_dir)
        if logs[dtype] and parse_log(logs[dtype])["min_val_bpb"] is not None and not args.force:
            print(f"{dtype}: finished run found in {run_dir}, reused", flush=True)
            continue
        launch(run_dir, [*train_argv, f"--dtype={dtype}", f"--model_tag={dtype}", f"--output_dir={out}", "--overwrite=true"])
        logs[dtype] = find_log(run_dir)
    result = compare(logs["float32"], logs["bfloat16"], args.after)
    worst = max(result["loss_diffs"], key=result["loss_diffs"].get)
    loss_ok = result["loss_diffs"][worst] <= args.max_loss_diff
    bpb_ok = result["bpb_diff"] <= args.max_bpb_diff
    print(f"loss after step {args.after}: largest |bf16 - fp32| / fp32 = {result['loss_diffs'][worst]:.4%} at step {worst} "
          f"(limit {args.max_loss_diff:.2%}): {'PASS' if loss_ok else 'FAIL'}")
    print(f"final val bpb: fp32 {result['bpb'][0]:.4f}, bf16 {result['bpb'][1]:.4f}, difference {result['bpb_diff']:.4%} "
          f"(limit {args.max_bpb_diff:.2%}): {'PASS' if bpb_ok else 'FAIL'}")
    if not (loss_ok and bpb_ok):
        raise SystemExit(1)


if __name__ == "__main__":
    run_cli(main)
