"""fp32 vs bf16: the same run in both matmul dtypes, and how far bf16's loss curve and val bpb drift.

    python -m scripts.compare_dtypes --out=/tmp/dtypes -- --depth=4 --max_seq_len=512 --device_batch_size=1 \\
        --eval_tokens=512 --core_metric_every=-1 --total_batch_size=512 --num_iterations=100 --device_type=cpu

Runs `python -m scripts.base_train_adaptive_svd <flags> --dtype=D` for D = float32 and bfloat16, one after
the other (one thread each), into <out>/base_checkpoints/<D>/; a finished run is reused (--force repeats
it). Then, from the two runs' train_metrics.jsonl: at every step after --after, the relative difference
of the loss the console prints (the debiased EMA), |bf16 - fp32| / fp32; and of the final val bpb.
Prints both, and PASS or FAIL against --max_loss_diff and --max_bpb_diff (exit status 1 on FAIL).
"""

import dataclasses
import os

from nanochat.checkpoint_manager import checkpoint_dir
from nanochat.cli import above, at_least, flag, parse_args, passthrough, required
from nanochat.common import UserError, run_cli
from nanochat.precision import DTYPES
from nanochat.jobs import Job, check_reserved, run_jobs
from nanochat.runs import finished, step_rows


@dataclasses.dataclass
class CompareDtypesConfig:
    out: str = required("output dir of the two runs")
    after: int = flag(10, "compare the loss at every step after this one", at_least(0))
    max_loss_diff: float = flag(0.02, "largest allowed relative loss difference", above(0))
    max_bpb_diff: float = flag(0.01, "largest allowed relative final val bpb difference", above(0))
    force: bool = flag(False, "repeat runs that already finished")
    train_flags: list[str] = passthrough("flags of scripts.base_train_adaptive_svd, the same for both runs")


def compare(fp32_rows, bf16_rows, after):
    """{'loss_diffs': {step: relative difference}, 'bpb': (fp32, bf16), 'bpb_diff': relative difference}."""
    losses = [{r["step"]: r["loss"] for r in rows if "loss" in r} for rows in (fp32_rows, bf16_rows)]
    bpbs = [[r["val_bpb"] for r in rows if r.get("val_bpb") is not None] for rows in (fp32_rows, bf16_rows)]
    if not all(losses) or not all(bpbs):
        raise UserError("a run has no step rows or no validation bpb; did both runs finish?")
    if set(losses[0]) != set(losses[1]):
        raise UserError("the two runs logged different steps; compare runs of the same flags")
    a, b = losses
    diffs = {s: abs(b[s] - a[s]) / abs(a[s]) for s in sorted(a) if s > after}
    bpb = (bpbs[0][-1], bpbs[1][-1])
    return {"loss_diffs": diffs, "bpb": bpb, "bpb_diff": abs(bpb[1] - bpb[0]) / bpb[0]}


def main(argv):
    args = parse_args(CompareDtypesConfig, argv, prog="python -m scripts.compare_dtypes", description=__doc__)
    check_reserved(args.train_flags, {"dtype", "model_tag", "output_dir", "resume", "overwrite"}, "scripts.compare_dtypes")
    out = os.path.abspath(args.out)
    jobs = [Job(dtype, checkpoint_dir(out, dtype), [*args.train_flags, f"--dtype={dtype}", f"--model_tag={dtype}",
                                                    f"--output_dir={out}"], finished) for dtype in DTYPES]
    run_jobs(jobs, slots=1, force=args.force)
    result = compare(*(step_rows(job.run_dir) for job in jobs), args.after)
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
