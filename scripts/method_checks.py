"""The method's checks as numbers: the v1 and v2 defects the reviews measured, re-measured on the code.

Every scenario runs the method's own code on synthetic layers (nanochat.synthetic): the real per-layer
analysis (nanochat.adaptive_svd.analyze / advance), or, where the statistic needs no SVD, its entry test
and decision (gradient_metrics, judge, decide, advance) on a layer with fixed learned directions.
tests/test_policy.py, tests/test_adaptive_svd.py and tests/test_adaptive_cycle.py assert the same
scenarios; experiments/ADAPTIVE_SVD_METHOD.md quotes this script's output.

    python -m scripts.method_checks [--seed=0]                 # the v1/v2 defects, re-measured
    python -m scripts.method_checks --section=calibration      # the entry test's false alarms (slow: ~30 min)
    python -m scripts.method_checks --section=power            # detection rate against the aligned energy share
    python -m scripts.method_checks --section=zero_init        # k of matrices grown from zero by Muon updates
    python -m scripts.method_checks --section=shift            # the shift reading on stationary and shifted gradients
    python -m scripts.method_checks --checkpoint=base_checkpoints/d4/checkpoint.pt   # k of every matrix of a run
    python -m scripts.method_checks --run=base_checkpoints/d4  # largest unclamped k per layer type in a run's log
"""

import math
import statistics
from dataclasses import dataclass

import torch

from nanochat import adaptive_svd as asvd
from nanochat import synthetic as syn
from nanochat.checkpoint_manager import load_checkpoint
from nanochat.cli import at_least, flag, one_of, parse_args
from nanochat.common import UserError, run_cli
from nanochat.gpt import AdaptiveSVDLinear
from nanochat.optim import Muon
from nanochat.runs import layer_records, layer_type, svd_records
from nanochat.synthetic import (CAL_KS, CAL_RANKS, CAL_SHAPES, concentrated_gradient, planted, random_gradient,
                                simulate, update_ratio_of_random_updates)

SHARES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def v2_count(S, n_out, n_in, tw=3.3):
    """What v2 counted as learned (for comparison only): values above the Marchenko-Pastur edge plus
    `tw` Tracy-Widom units, with the bulk's entry std from the energy the outliers leave."""
    S = S.double()
    total, k = float(S.square().sum()), 0
    while True:
        sigma = math.sqrt(max(total - float(S[:k].square().sum()), 0.0) / ((n_out - k) * (n_in - k)))
        edge = sigma * (math.sqrt(n_out) + math.sqrt(n_in) + tw * (n_out ** -0.5 + n_in ** -0.5) ** (1 / 3) / 2)
        k_next = int((S > edge).sum())
        if k_next <= k:
            return k
        k = k_next


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
    """For every block matrix of a checkpoint: its shape, largest singular value, the count of learned
    directions (and whether the clamp binds), the bulk threshold, and what v2 counted."""
    ckpt = load_checkpoint(path)
    print(f"{path}: step {ckpt['metadata']['step']}, svd_gap {policy.svd_gap:g}, k <= {policy.svd_k_max_frac:g} g")
    for name, W in ckpt["model"].items():
        if not name.startswith("transformer.h.") or W.ndim != 2:
            continue
        n_out, n_in = W.shape
        S = torch.linalg.svdvals(W.float())
        learned, threshold = asvd.count_learned(S, min(n_out, n_in), policy.svd_gap)
        cap = asvd.k_max(min(n_out, n_in), policy)
        clamp = f" (clamped to {cap})" if learned > cap else ""
        print(f"  {name[len('transformer.h.'):-len('.weight')]:<14} {n_out}x{n_in}  s_max {float(S[0]):.4f}  "
              f"learned {learned:>2}{clamp}  threshold {threshold:.4f}  v2 counted {v2_count(S, n_out, n_in)}")


def run_k(run_dir):
    """Per layer type of a run's svd_metrics.jsonl: the largest unclamped count of learned directions,
    the layer and step where it was read, and how many analyses the clamp bound."""
    layers = layer_records(svd_records(run_dir))
    if not layers:
        raise UserError(f"no analyses in {run_dir}/svd_metrics.jsonl")
    by_type = {}
    for layer, recs in layers.items():
        by_type.setdefault(layer_type(layer), []).extend(recs)
    steps = sorted({r["step"] for recs in layers.values() for r in recs})
    print(f"{run_dir}: {len(layers)} layers, analyses at steps {', '.join(map(str, steps))}")
    print("| layer type | layers | largest unclamped k (layer, step) | analyses the clamp bound |")
    print("|---|---|---|---|")
    for kind, recs in sorted(by_type.items()):
        top = max(recs, key=lambda r: (r.get("k_learned") or 0, -r["step"]))
        clamped = sum(bool(r.get("k_clamped")) for r in recs)
        count = len({r["layer"] for r in recs})
        print(f"| {kind} | {count} | {top.get('k_learned')} ({top['layer']}, step {top['step']}) | {clamped} of {len(recs)} |")


def calibration(analyses, seed, shapes=CAL_SHAPES, ks=CAL_KS, ranks=CAL_RANKS):
    """The entry test's false alarms: switches into protection per `analyses` analyses of gradients
    independent of the learned directions, for W moving along the analysed gradient / independently."""
    policy = asvd.SVDPolicy()
    print(f"Switches per {analyses} analyses, gradients independent of the k learned directions "
          f"(svd_alpha {policy.svd_alpha:g}, svd_patience {policy.svd_patience}); cells: W moving along the "
          f"analysed gradient / W moving independently of it")
    print("| shape | k | rank 1 | rank 2 | rank 4 | full rank |")
    print("|---|---|---|---|---|---|")
    worst = 0
    for shape in shapes:
        for k in ks:
            cells = []
            for rank in ranks:
                n = syn.null_switches(shape, k, rank, analyses, seed=seed, policy=policy)
                worst = max(worst, *n.values())
                cells.append(f"{n['along']} / {n['independent']}")
            print(f"| {shape[0]}x{shape[1]} | {k} | " + " | ".join(cells) + " |", flush=True)
    print(f"most switches in any cell: {worst}")


def power(trials, seed, shapes=CAL_SHAPES, ks=CAL_KS):
    """Detection rate within svd_patience analyses against the share of the gradient's energy in the top-k block."""
    policy = asvd.SVDPolicy()
    for rest, label in ((None, "the rest Gaussian (full rank)"), (1, "the rest a random rank-1 gradient")):
        print(f"Share of {trials} layers switched within svd_patience ({policy.svd_patience}) analyses; the gradient's "
              f"energy share in the top-k block as below, {label}")
        print("| shape | k | " + " | ".join(f"{s:g}" for s in SHARES) + " |")
        print("|---|---|" + "---|" * len(SHARES))
        for shape in shapes:
            for k in ks:
                rates = [syn.detection_rate(shape, k, share, rest, trials, seed, policy) for share in SHARES]
                print(f"| {shape[0]}x{shape[1]} | {k} | " + " | ".join(f"{r:.2f}" for r in rates) + " |", flush=True)


def count_of(W, policy):
    return asvd.count_learned(torch.linalg.svdvals(W), min(W.shape), policy.svd_gap)[0]


def zero_init(draws, seed, shape=(256, 256), planted_dirs=3):
    """k of matrices summed from zero out of independent Muon-style updates, without and with planted
    persistent directions, with what v2 counted on the same matrices."""
    policy = asvd.SVDPolicy()
    g, cap = min(shape), asvd.k_max(min(shape), policy)
    print(f"{draws} draws of {shape[0]}x{shape[1]} matrices summed from zero out of independent Muon-style updates "
          f"(Newton-Schulz of a random gradient, no shared direction); planted: {planted_dirs} persistent directions "
          f"whose singular value is the strength shown times the noise's largest")
    print("| updates made from | updates | k = 0 (nothing planted) | v2 counted (median, max) | planted found at 1.1x | "
          "1.25x | 1.5x |")
    print("|---|---|---|---|---|---|---|")
    for kind, label in syn.UPDATE_KINDS.items():
        for updates in (10, 100):
            zero, v2, found = 0, [], {1.1: 0, 1.25: 0, 1.5: 0}
            for d in range(draws):
                draw = seed * 10_007 + d
                W = syn.grown_from_zero(shape, updates, kind, draw)
                S = torch.linalg.svdvals(W)
                zero += asvd.count_learned(S, g, policy.svd_gap)[0] == 0
                v2.append(min(v2_count(S, *shape), cap))
                for strength in found:
                    found[strength] += count_of(syn.plant(W, planted_dirs, strength, draw)[0], policy) == planted_dirs
            print(f"| {label} | {updates} | {zero}/{draws} | {statistics.median(v2):g}, {max(v2)} (clamp {cap}) | "
                  + " | ".join(f"{found[s]}/{draws}" for s in found) + " |", flush=True)
    print(f"Pure Gaussian matrices (the bulk v2's Marchenko-Pastur edge describes), {draws} draws each:")
    gen = torch.Generator().manual_seed(seed)
    for n_out, n_in in ((256, 256), (1024, 256), (256, 1024)):
        zero = sum(count_of(torch.randn(n_out, n_in, generator=gen), policy) == 0 for _ in range(draws))
        print(f"   {n_out}x{n_in}: k = 0 in {zero}/{draws}")


def shift_reading(analyses, seed, shape=(256, 256), k=3):
    """The shift reading on gradients that are aligned all along (a stationary share in the top-k block)
    and on gradients whose aligned share jumps halfway: what each policy does."""
    window = asvd.SVDPolicy().svd_shift_window
    print(f"{analyses} analyses of a {shape[0]}x{shape[1]} layer with k = {k}, gradients of rank 1 with the share of "
          f"their energy in the top-k block shown; svd_shift_window {window}")
    print("| aligned share | policy | switches to protected | protected analyses | first switch |")
    print("|---|---|---|---|---|")
    for label, share_at in (("0.2 throughout", lambda t: 0.2), ("0.2, then 0.8 from the middle on",
                                                                  lambda t: 0.2 if t < analyses // 2 else 0.8)):
        for policy_name in ("adaptive", "shift"):
            policy = asvd.SVDPolicy(svd_policy=policy_name)
            run = syn.fixed_basis_run(shape, k, lambda t, U, V, gen: syn.aligned_gradient(U, V, share_at(t), 1, gen),
                                      analyses, ("independent",), policy, seed)["independent"]
            switches = [t for t, (action, _, _) in enumerate(run) if action == asvd.Action.TO_LOWRANK]
            protected, mode = 0, asvd.Mode.FULL
            for action, _, _ in run:
                mode = action.mode_after(mode)
                protected += mode == asvd.Mode.LOWRANK
            print(f"| {label} | {policy_name} | {len(switches)} | {protected} | "
                  f"{switches[0] if switches else '-'} |")


@dataclass
class ChecksConfig:
    seed: int = flag(0, "seed of the synthetic layers and gradients", at_least(0))
    section: str = flag("v2", "which checks: v2 (the v1/v2 defects), calibration, power, zero_init or shift",
                        one_of("v2", "calibration", "power", "zero_init", "shift"))
    analyses: int = flag(1000, "analyses per calibration cell", at_least(10))
    trials: int = flag(50, "layers per power cell", at_least(1))
    draws: int = flag(100, "matrices per zero_init row", at_least(1))
    checkpoint: str = flag("", "instead: count the learned directions of every matrix in this checkpoint")
    run: str = flag("", "instead: the largest unclamped k per layer type in this run's svd_metrics.jsonl")


def main(argv):
    cfg = parse_args(ChecksConfig, argv, "python -m scripts.method_checks", __doc__)
    torch.set_num_threads(1)  # the numbers do not depend on it; the machine may be shared
    if cfg.checkpoint:
        return checkpoint_spectra(cfg.checkpoint, asvd.SVDPolicy())
    if cfg.run:
        return run_k(cfg.run)
    if cfg.section != "v2":
        section = {"calibration": lambda: calibration(cfg.analyses, cfg.seed),
                   "power": lambda: power(cfg.trials, cfg.seed),
                   "zero_init": lambda: zero_init(cfg.draws, cfg.seed),
                   "shift": lambda: shift_reading(200, cfg.seed)}[cfg.section]
        return section()
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
          f"p-value {records[1]['alignment_p']:.1e}, modes {''.join(m[0].upper() for m in modes)}")
    print("4. Cycles: 200 analyses of a 256x256 layer with 10 learned directions")
    for label, rank in (("Gaussian gradients", None), ("random rank-4 gradients", 4)):
        W, U, V = planted(256, 256, 10, seed=s)
        modes, records = simulate(W, lambda t, W, Uk, Vk: random_gradient(W.shape, rank, t), analyses=200)
        ratios = [r["alignment_ratio"] for r in records if r["alignment_ratio"] is not None]
        p_min = min(r["alignment_p"] for r in records if r["alignment_p"] is not None)
        print(f"   {label}: {sum(m == asvd.Mode.LOWRANK for m in modes)} protected analyses, mean ratio "
              f"{sum(ratios) / len(ratios):.3f}, max {max(ratios):.3f}, smallest p-value {p_min:.1e}")
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
    res, k, _, _ = asvd.spectrum(W, "warm", wrong, 256, gap=asvd.SVDPolicy().svd_gap, k_max=60)
    rejected = [note for note in res.notes if "rejected" in note]
    print(f"   certified: method {res.method}, k = {k}; {rejected[0] if rejected else 'accepted'}")


if __name__ == "__main__":
    run_cli(main)
