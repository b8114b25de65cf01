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
import statistics
import time

import torch

from nanochat import adaptive_svd as asvd
from nanochat.cli import flag, parse_args
from nanochat.common import UserError, run_cli


@dataclasses.dataclass
class BenchConfig:
    device: str = flag("", "device to run on; empty = cuda when available, else cpu")
    shapes: list[str] = flag(["1280x1280", "5120x1280"], "matrix shapes n_out x n_in (d20's; d4's are 256x256 1024x256)")
    rel: list[float] = flag([5e-2, 1e-2, 1e-3], "relative Frobenius size of the update between analyses")
    analyses: int = flag(4, "analyses per shape and size of update")
    spikes: int = flag(64, "learned directions in the start matrix")
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


def bench_shape(n_out, n_in, rel, analyses, spikes, seed, device):
    """Exact vs warm analyses of one drifting matrix: the SVD plus the count of learned directions, the
    warm one certified (else redone exactly, as in a run), chained from the previous analysis' basis.
    Returns the medians and the checks as a dict."""
    gen = torch.Generator().manual_seed(seed)
    W, U_s = trained_matrix(n_out, n_in, spikes, gen, device)
    k_max = max(1, min(n_out, n_in) // 10)
    g = min(n_out, n_in)
    count = dict(gap=asvd.SVDPolicy().svd_gap, k_max=k_max)
    first, k, _, _ = asvd.spectrum(W, "exact", None, g, **count)
    asvd.spectrum(W, "warm", first.Vh[:k].T, g, **count)  # untimed: first-call overheads of the kernels
    prev_V, momentum = first.Vh[:k].T, torch.zeros_like(W)
    exact_t, warm_t, captured, methods, ks = [], [], [], [], []
    for _ in range(analyses):
        grad = U_s @ torch.randn(U_s.shape[1], n_in, generator=gen).to(device)
        grad += 0.5 * torch.randn(n_out, n_in, generator=gen).to(device) * grad.norm() / (n_out * n_in) ** 0.5
        momentum = 0.95 * momentum + grad
        update = newton_schulz(momentum)
        W = W + update * (rel * W.norm() / update.norm())
        (exact, k, _, _), t_exact = timed(lambda: asvd.spectrum(W, "exact", None, g, **count), device)
        (warm, k_warm, _, _), t_warm = timed(lambda: asvd.spectrum(W, "warm", prev_V, g, **count), device)
        true_top = float(exact.S[:k].double().square().sum())
        captured.append(float((warm.U[:, :k].T @ W).double().square().sum()) / true_top if k else 1.0)
        methods.append(warm.method)
        ks.append((k, k_warm))
        exact_t.append(t_exact)
        warm_t.append(t_warm)
        prev_V = warm.Vh[:k_warm].T
    return {"shape": (n_out, n_in), "rel": rel, "k": ks[-1][0], "exact_s": statistics.median(exact_t),
            "warm_s": statistics.median(warm_t), "captured_min": min(captured), "same_k": all(a == b for a, b in ks),
            "accepted": methods.count("warm"), "analyses": len(methods)}


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
    try:
        shapes = [tuple(int(n) for n in shape.lower().split("x")) for shape in args.shapes]
    except ValueError:
        raise UserError(f"--shapes expects sizes like 1280x1280, got {args.shapes}") from None
    for n_out, n_in in shapes:
        for rel in args.rel:
            print(describe(bench_shape(n_out, n_in, rel, args.analyses, args.spikes, args.seed, device)), flush=True)


if __name__ == "__main__":
    run_cli(main)
