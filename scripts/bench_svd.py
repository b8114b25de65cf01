"""Benchmark: exact vs warm-started SVD on d20-shaped weights drifting between analyses.

Each shape starts from a "trained" matrix (init-scale Gaussian bulk plus decaying learned spikes).
Between analyses it receives a Muon-style update (Newton-Schulz-orthogonalised momentum that favours
the learned directions) of relative Frobenius size --rel. Each analysis times an exact SVD and a warm
SVD started from the previous analysis' warm result, and measures the warm result's captured top-k
energy ||U_k^T W||_F^2 / sum of the true top-k S^2. Prints numbers; not a test.

    python -m scripts.bench_svd [--device cuda] [--k 200] [--energy 0.5] [--rel 1e-2 1e-3]
"""

import dataclasses
import statistics
import time

import torch

from nanochat import adaptive_svd as asvd
from nanochat.cli import flag, parse_args
from nanochat.common import UserError, run_cli


@dataclasses.dataclass
class BenchConfig:
    device: str = flag("", "device to run on; empty = cuda when available, else cpu")
    k: int = flag(0, "top-k tracked (0: choose from --energy)")
    energy: float = flag(0.5, "share of ||W||_F^2 the top k hold")
    rel: list[float] = flag([5e-2, 1e-2, 1e-3], "relative Frobenius size of the update between analyses")
    analyses: int = flag(4, "analyses per shape and size of update")
    spikes: int = flag(64, "learned directions in the start matrix")
    iters: int = flag(1, "subspace iterations of the warm SVD")
    oversample: int = flag(16, "extra columns of the warm SVD's start basis")
    tol: float = flag(0.02, "residual tolerance of the warm SVD's certificate")
    seed: int = flag(0, "random seed of the matrices and gradients")


def newton_schulz(M, steps=5):
    """Muon's orthogonalisation: quintic Newton-Schulz on the Frobenius-normalised matrix."""
    a, b, c = 3.4445, -4.7750, 2.0315
    X = M / (M.norm() + 1e-7)
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def trained_matrix(n_out, n_in, spikes, gen, device):
    """Gaussian init with the model's std plus `spikes` learned directions whose singular values decay
    from 4x to 1x the bulk edge; returns W and the learned left directions."""
    std = n_in ** -0.5 * min(1.0, (n_out / n_in) ** 0.5)
    W = torch.randn(n_out, n_in, generator=gen) * std
    edge = std * (n_out ** 0.5 + n_in ** 0.5)
    U_s = torch.linalg.qr(torch.randn(n_out, spikes, generator=gen))[0]
    V_s = torch.linalg.qr(torch.randn(n_in, spikes, generator=gen))[0]
    s = edge * torch.logspace(0.6, 0, spikes)
    return (W + (U_s * s) @ V_s.T).to(device), U_s.to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def bench_shape(n_out, n_in, rel, args, device):
    gen = torch.Generator().manual_seed(args.seed)
    W, U_s = trained_matrix(n_out, n_in, args.spikes, gen, device)
    first = asvd.svd(W, "exact")
    k = args.k or asvd.choose_k(first.S, args.energy)
    asvd.svd(W, "warm", prev=first, k=k)  # untimed: first-call overheads of the kernels
    prev, momentum = first, torch.zeros_like(W)
    exact_t, warm_t, captured, residuals, methods = [], [], [], [], []
    for _ in range(args.analyses):
        grad = U_s @ torch.randn(U_s.shape[1], n_in, generator=gen).to(device)
        grad += 0.5 * torch.randn(n_out, n_in, generator=gen).to(device) * grad.norm() / (n_out * n_in) ** 0.5
        momentum = 0.95 * momentum + grad
        update = newton_schulz(momentum)
        W = W + update * (rel * W.norm() / update.norm())
        exact, t_exact = timed(lambda: asvd.svd(W, "exact"), device)
        warm, t_warm = timed(lambda: asvd.svd(W, "warm", prev=prev, k=k, iters=args.iters,
                                              oversample=args.oversample, tol=args.tol), device)
        true_top = float(exact.S[:k].double().square().sum())
        captured.append(float((warm.U[:, :k].T @ W).double().square().sum()) / true_top)
        residuals.append(warm.residual)
        methods.append(warm.method)
        exact_t.append(t_exact)
        warm_t.append(t_warm)
        prev = warm
    t_e, t_w = statistics.median(exact_t), statistics.median(warm_t)
    kept = [r for r in residuals if r is not None]
    print(f"{n_out:>5}x{n_in:<5} rel={rel:<7g} k={k:<4} exact {t_e * 1e3:8.1f} ms  warm {t_w * 1e3:7.1f} ms  "
          f"speed-up {t_e / t_w:5.1f}x  captured energy min {min(captured):.5f}  "
          f"residual max {max(kept) if kept else float('nan'):.2e}  "
          f"warm accepted {methods.count('warm')}/{len(methods)}", flush=True)


def main(argv):
    args = parse_args(BenchConfig, argv, prog="python -m scripts.bench_svd", description=__doc__)
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise UserError(f"--device={args.device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device is cuda but no CUDA device is available; use --device=cpu")
    print(f"device {device}, torch threads {torch.get_num_threads()}, median over {args.analyses} analyses")
    for n_out, n_in in ((1280, 1280), (5120, 1280)):
        for rel in args.rel:
            bench_shape(n_out, n_in, rel, args, device)


if __name__ == "__main__":
    run_cli(main)
