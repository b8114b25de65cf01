"""The method's checks as numbers: each v1 defect the review measured, re-measured on the v2 code.

Every scenario runs the real per-layer analysis (nanochat.adaptive_svd.analyze / advance), the real
projection and the real Muon step on synthetic layers: a Gaussian bulk with the model's init std plus
planted learned directions. tests/test_policy.py and tests/test_adaptive_cycle.py assert the same
scenarios; experiments/ADAPTIVE_SVD_METHOD.md quotes this script's output.

    python -m scripts.method_checks [--seed=0]
    python -m scripts.method_checks --checkpoint=base_checkpoints/d4/checkpoint.pt   # k of every matrix of a run
"""

from dataclasses import dataclass

import torch

from nanochat import adaptive_svd as asvd
from nanochat.checkpoint_manager import load_checkpoint
from nanochat.cli import at_least, flag, parse_args
from nanochat.common import run_cli
from nanochat.gpt import AdaptiveSVDLinear
from nanochat.optim import Muon
from nanochat.synthetic import (concentrated_gradient, planted, random_gradient, simulate,
                                update_ratio_of_random_updates)


def muon_step_sizes(shape, k, seed):
    """One Muon step on the same gradient, full mode vs protected with k learned directions:
    (||dW_protected|| / ||dW_full||, median nonzero singular value of dW_protected / of dW_full,
    max |dW_protected - dW_full| at k = 0)."""
    W, U, V = planted(*shape, j=max(k, 1), seed=seed)
    G = random_gradient(shape, None, seed)

    def step(k_used):
        layer = AdaptiveSVDLinear(shape[1], shape[0])
        with torch.no_grad():
            layer.weight.copy_(W)
        if k_used is not None:
            layer.protect(U[:, :k_used], V[:, :k_used])
        muon = Muon([("w", layer.weight)], lr=0.02, layers={layer.weight: layer})
        layer.weight.grad = G.clone()
        muon.step()
        return (layer.weight - W).detach()

    full, prot, zero = step(None), step(k), step(0)
    s_full, s_prot = torch.linalg.svdvals(full), torch.linalg.svdvals(prot)
    g = min(shape)
    return (float(prot.norm() / full.norm()), float(s_prot[: g - k].median() / s_full.median()),
            float((zero - full).abs().max()))


def checkpoint_spectra(path, policy):
    """For every block matrix of a checkpoint: shape, largest singular value, the bulk threshold, k, and
    how many Tracy-Widom units the largest value sits above the Marchenko-Pastur edge."""
    ckpt = load_checkpoint(path)
    print(f"{path}: step {ckpt['metadata']['step']}, svd_edge_tw {policy.svd_edge_tw}, k <= {policy.svd_k_max_frac:g} g")
    for name, W in ckpt["model"].items():
        if not name.startswith("transformer.h.") or W.ndim != 2:
            continue
        n_out, n_in = W.shape
        S = torch.linalg.svdvals(W.float())
        k, sigma, threshold = asvd.count_learned(S, float(S.double().square().sum()), n_out, n_in,
                                                 policy.svd_edge_tw, asvd.k_max(min(n_out, n_in), policy))
        unit = asvd.bulk_threshold(sigma, n_out, n_in, 1.0) - asvd.bulk_threshold(sigma, n_out, n_in, 0.0)
        above = (float(S[0]) - asvd.bulk_threshold(sigma, n_out, n_in, 0.0)) / unit if unit > 0 else float("nan")
        print(f"  {name[len('transformer.h.'):-len('.weight')]:<14} {n_out}x{n_in}  s_max {float(S[0]):.4f}  "
              f"threshold {threshold:.4f}  k {k:>2}  s_max - edge = {above:+.1f} TW units")


@dataclass
class ChecksConfig:
    seed: int = flag(0, "seed of the synthetic layers and gradients", at_least(0))
    checkpoint: str = flag("", "instead: count the learned directions of every matrix in this checkpoint")


def main(argv):
    cfg = parse_args(ChecksConfig, argv, "python -m scripts.method_checks", __doc__)
    if cfg.checkpoint:
        return checkpoint_spectra(cfg.checkpoint, asvd.SVDPolicy())
    torch.manual_seed(cfg.seed)
    s = cfg.seed
    print("1. Step size: one Muon step on the same gradient, 256x256, protected vs full")
    for k in (0, 10, 25):
        norm_ratio, per_direction, diff0 = muon_step_sizes((256, 256), k, s)
        extra = f", max |difference| at k = 0: {diff0:.1e}" if k == 0 else ""
        print(f"   k = {k:2d}: ||dW|| ratio {norm_ratio:.4f} (sqrt(r/g) = {((256 - k) / 256) ** 0.5:.4f}), "
              f"per-direction step (median singular value) ratio {per_direction:.4f}{extra}")
    print("2. Parameters: the protected layer trains `weight` only (65,536 values for 256x256) and holds two "
          "bases, 2 x 256 x k values (12,800 at the clamp k = 25); the parameter set never changes")
    print("3. Reachability: a gradient entirely inside the 11 learned directions of a 256x256 layer")
    W, U, V = planted(256, 256, 11, seed=s)
    modes, records = simulate(W, lambda t, W, Uk, Vk: concentrated_gradient(U, V, W.shape, 1.0, t), analyses=6)
    print(f"   alignment_ratio {records[1]['alignment_ratio']:.1f} (ceiling n_out / k = {256 / 11:.1f}), "
          f"modes {''.join(m[0].upper() for m in modes)}")
    print("4. Cycles: 200 analyses of a 256x256 layer with 10 learned directions")
    for label, rank in (("Gaussian gradients", None), ("random rank-4 gradients", 4)):
        W, U, V = planted(256, 256, 10, seed=s)
        modes, records = simulate(W, lambda t, W, Uk, Vk: random_gradient(W.shape, rank, t), analyses=200)
        ratios = [r["alignment_ratio"] for r in records if r["alignment_ratio"] is not None]
        print(f"   {label}: {sum(m == asvd.Mode.LOWRANK for m in modes)} protected analyses, mean ratio "
              f"{sum(ratios) / len(ratios):.3f}, max {max(ratios):.3f}")
    W, U, V = planted(256, 256, 10, seed=s)
    modes, _ = simulate(W, lambda t, W, Uk, Vk: concentrated_gradient(U, V, W.shape, 0.8, t) if 20 <= t < 60
                        else random_gradient(W.shape, None, t), analyses=100)
    print(f"   pressure during analyses 20-59 only: {''.join(m[0].upper() for m in modes)}")
    print("5. Update metric: random rank-4 updates independent of W (256x256, 100 draws), mean update ratio")
    for rel in (0.1, 0.3):
        new = update_ratio_of_random_updates((256, 256), 4, rel, 100, s, against_new=True)
        prev = update_ratio_of_random_updates((256, 256), 4, rel, 100, s)
        print(f"   |dW|/|W| = {rel}: against the new W's basis (v1) {sum(new) / len(new):.2f}, "
              f"against the previous analysis' basis (v2) {sum(prev) / len(prev):.3f}")
    print("6. Largest principal angle: logged, no longer a decision input. Random 0.1|W| perturbations of a "
          "256x256 layer with 10 learned directions:")
    W, _, _ = planted(256, 256, 10, seed=s)
    U0 = torch.linalg.svd(W, full_matrices=False)[0][:, :10]
    angles = []
    for d in range(100):
        dW = random_gradient(W.shape, None, d)
        U1 = torch.linalg.svd(W + 0.1 * W.norm() * dW / dW.norm(), full_matrices=False)[0][:, :10]
        angles.append(asvd.principal_angles(U0, U1)[0])
    print(f"   share of draws with angle > 0.5 rad: {sum(a > 0.5 for a in angles) / len(angles):.2f}")
    print("7. Warm SVD: a top cluster of 40 nearly equal learned values, start basis = the 20 directions below it")
    ratios = [3.0 - 0.001 * i for i in range(40)] + [2.0 - 0.01 * i for i in range(20)]
    W, _, _ = planted(256, 256, 60, seed=4, ratios=ratios)
    wrong = torch.linalg.svd(W, full_matrices=False)[2][40:60].T
    raw = asvd.svd(W, "warm", wrong)
    true = torch.linalg.svdvals(W.double())[:40].square().sum()
    print(f"   uncertified warm block: captured top-40 energy {float((raw.U[:, :40].double().T @ W.double()).square().sum() / true):.3f}")
    res, k, _, _ = asvd.spectrum(W, "warm", wrong, 256, 256, tw=3.3, k_max=60)
    rejected = [note for note in res.notes if "rejected" in note]
    print(f"   certified: method {res.method}, k = {k}; {rejected[0] if rejected else 'accepted'}")


if __name__ == "__main__":
    run_cli(main)
