"""Benchmark: exact vs warm-started SVD on d20-shaped weights drifting between analyses.

Each shape starts from a "trained" matrix (init-scale Gaussian bulk plus decaying learned spikes).
Between analyses it receives a Muon-style update (Newton-Schulz-orthogonalised momentum that favours
the learned directions) of relative Frobenius size --rel. Each analysis times what a run does: an exact
SVD plus the count of learned directions k (<= g/10), and a warm one started from the previous analysis'
basis and accepted only with its certificate (else redone exactly, which the time then includes). It
reports the warm result's captured top-k energy ||U_k^T W||_F^2 / sum of the true top-k S^2 and whether
both found the same k. Prints numbers; not a test.

    python -m scripts.bench_svd [--device cuda] [--rel 1e-2 1e-3] [--spikes 64] [--shapes 256x256 1024x256]
"""

import dataclasses
import re

import torch

from nanochat.cli import Check, above, at_least, flag, parse_args
from nanochat.common import UserError, run_cli
from nanochat.synthetic import bench_shape

SHAPE = Check(lambda v: re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", v.lower()) is not None, "sizes like 1280x1280")


@dataclasses.dataclass
class BenchConfig:
    device: str = flag("", "device to run on; empty = cuda when available, else cpu")
    shapes: list[str] = flag(["1280x1280", "5120x1280"], "matrix shapes n_out x n_in (d20's; d4's are 256x256 1024x256)",
                             SHAPE)
    rel: list[float] = flag([5e-2, 1e-2, 1e-3], "relative Frobenius size of the update between analyses", above(0))
    analyses: int = flag(4, "analyses per shape and size of update", at_least(1))
    spikes: int = flag(64, "learned directions in the start matrix", at_least(1))
    seed: int = flag(0, "random seed of the matrices and gradients", at_least(0))


def describe(r):
    n_out, n_in = r["shape"]
    return (f"{n_out:>5}x{n_in:<5} rel={r['rel']:<7g} k={r['k']:<4} exact {r['exact_s'] * 1e3:8.1f} ms  "
            f"warm {r['warm_s'] * 1e3:7.1f} ms  speed-up {r['exact_s'] / r['warm_s']:5.1f}x  "
            f"captured energy min {r['captured_min']:.5f}  same k {r['same_k']}  warm accepted {r['accepted']}/{r['analyses']}")


def main(argv):
    args = parse_args(BenchConfig, argv, prog="python -m scripts.bench_svd", description=__doc__)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device={args.device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device is cuda but no CUDA device is available; use --device=cpu")
    print(f"device {device}, torch threads {torch.get_num_threads()}, median over {args.analyses} analyses")
    for n_out, n_in in (tuple(int(n) for n in shape.lower().split("x")) for shape in args.shapes):
        for rel in args.rel:
            print(describe(bench_shape(n_out, n_in, rel, args.analyses, args.spikes, args.seed, device)), flush=True)


if __name__ == "__main__":
    run_cli(main)
