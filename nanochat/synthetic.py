"""Synthetic layers for measuring the method without a training run (scripts.method_checks, scripts.bench_svd,
scripts.gpu_check and the tests).

A synthetic layer is a Gaussian bulk with the model's init std plus planted learned directions. `simulate`
runs the real per-layer analysis (nanochat.adaptive_svd.analyze / advance) and the real projection on one;
`bench_shape` times exact vs certified warm SVDs of one matrix drifting under Muon-style updates.
"""

import statistics
import time

import torch

from nanochat import adaptive_svd as asvd
from nanochat.optim import zeropower_via_newtonschulz5


def planted(n_out, n_in, j, seed, ratios=None):
    """A Gaussian bulk with the model's init std plus j learned directions at `ratios` x the bulk edge
    (default 4x down to 1.5x). Returns (W float32, planted left basis, planted right basis)."""
    gen = torch.Generator().manual_seed(seed)
    std = n_in ** -0.5 * min(1.0, (n_out / n_in) ** 0.5)
    W = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64) * std
    edge = std * (n_out ** 0.5 + n_in ** 0.5)
    U = torch.linalg.qr(torch.randn(n_out, j, generator=gen, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n_in, j, generator=gen, dtype=torch.float64))[0]
    s = edge * (torch.linspace(4.0, 1.5, j, dtype=torch.float64) if ratios is None
                else torch.tensor(ratios, dtype=torch.float64))
    return (W + (U * s) @ V.T).float(), U.float(), V.float()


def random_gradient(shape, rank, seed):
    """A Gaussian gradient (rank None) or a random rank-`rank` one, independent of W."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    if rank is None:
        return torch.randn(*shape, generator=gen)
    return torch.randn(shape[0], rank, generator=gen) @ torch.randn(rank, shape[1], generator=gen)


def concentrated_gradient(U, V, shape, share, seed):
    """A gradient with `share` of its squared norm inside span(U) x span(V), the rest Gaussian."""
    gen = torch.Generator().manual_seed(20_000 + seed)
    inside = U @ torch.randn(U.shape[1], V.shape[1], generator=gen) @ V.T
    noise = torch.randn(*shape, generator=gen)
    inside = inside / inside.norm() * share ** 0.5
    return inside + noise / noise.norm() * (1 - share) ** 0.5


def simulate(W, gradient, analyses, policy=None, rel=0.01, keep_states=False, method="warm"):
    """`analyses` analyses of one layer: analyse W with this step's gradient, apply the decision,
    then step W by rel * ||W|| along the gradient (projected while protected). gradient(t, W, U_k, V_k).
    The SVD is warm-started from the previous analysis (certified, else exact), as a large layer's
    is in a run. Returns (mode after each analysis, the record of each analysis)."""
    policy = policy or asvd.SVDPolicy()
    state = asvd.LayerState()
    modes, records = [], []
    for t in range(analyses):
        G = gradient(t, W, state.U_k, state.V_k)
        out = asvd.analyze(W, G, state, policy, step=t + 1, method=method)
        state = asvd.advance(state, out, W)
        record = dict(out.metrics, action=out.action, reason=out.reason, mode=state.mode, svd_method=out.method)
        if keep_states:
            record.update(state=state, W=W.clone())
        modes.append(state.mode)
        records.append(record)
        step = asvd.project(G, state.U_k, state.V_k) if state.mode == asvd.Mode.LOWRANK else G
        W = W - rel * W.norm() * step / step.norm()
    return modes, records


def update_ratio_of_random_updates(shape, rank, rel, draws, seed, against_new=False):
    """Update alignment ratios of random rank-`rank` updates of size rel * ||W||, independent of W:
    measured against the previous analysis' basis (v2), or, with against_new, against the top-k of
    the updated W (what v1 did)."""
    W, _, _ = planted(*shape, j=10, seed=seed)
    policy = asvd.SVDPolicy()
    state = asvd.advance(asvd.LayerState(), asvd.analyze(W, None, asvd.LayerState(), policy, 1), W)
    ratios = []
    for d in range(draws):
        dW = random_gradient(shape, rank, seed=seed * 1000 + d)
        W2 = W + rel * W.norm() * dW / dW.norm()
        if against_new:
            k = state.U_k.shape[1]
            U_new = torch.linalg.svd(W2, full_matrices=False)[0][:, :k]
            ratios.append(asvd.alignment_ratio(asvd.alignment(W2 - W, U_new), k, shape[0]))
        else:
            ratios.append(asvd.analyze(W2, None, state, policy, 2, method="warm").metrics["update_alignment_ratio"])
    return ratios


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


# ---------------------------------------------------------------------------------------------
# The entry test through the run's own decision code, without a training run and without an SVD:
# a layer whose k learned directions are held fixed, and gradients drawn afresh at every analysis.

# the calibration table: shapes (d4's and d20's), learned directions, gradient ranks (None = full)
CAL_SHAPES = ((256, 256), (1024, 256), (256, 1024), (1280, 1280))
CAL_KS = (1, 2, 3, 10, 25)
CAL_RANKS = (1, 2, 4, None)


def _orthonormal(n, k, gen):
    return torch.linalg.qr(torch.randn(n, k, generator=gen))[0]


def draw_gradient(shape, rank, gen):
    """A random gradient: Gaussian (rank None) or a product of Gaussian factors of rank `rank`."""
    if rank is None:
        return torch.randn(*shape, generator=gen)
    return torch.randn(shape[0], rank, generator=gen) @ torch.randn(rank, shape[1], generator=gen)


def aligned_gradient(U, V, share, rest_rank, gen):
    """A gradient with `share` of its squared norm inside the block span(U) x span(V) (a random matrix
    there), the rest a random gradient of rank `rest_rank` (None = Gaussian) independent of the block."""
    inside = U @ torch.randn(U.shape[1], V.shape[1], generator=gen) @ V.T
    rest = draw_gradient((U.shape[0], V.shape[0]), rest_rank, gen)
    return inside * (share / float(inside.square().sum())) ** 0.5 + rest * ((1 - share) / float(rest.square().sum())) ** 0.5


def fixed_basis_run(shape, k, gradient, analyses, motions=("along",), policy=None, seed=0):
    """`analyses` analyses of a layer with k learned directions held fixed (random U_k, V_k), through the
    run's decision code: gradient_metrics (the entry statistic against U_k), the update's alignment,
    judge (the shift reading and decide) and advance; no SVD, since the statistic needs only U_k and G.
    gradient(t, U, V, gen) -> this analysis' G. Each of `motions` is a layer of its own fed the same
    gradients: 'along' = the update measured at an analysis is the gradient analysed at the one before
    (W moved along it: the same noise a second time), 'independent' = an independent draw of the same
    kind. The layer's baseline analysis is taken as done. Returns {motion: [(action, reason, metrics)]}."""
    policy = policy or asvd.SVDPolicy()
    gen = torch.Generator().manual_seed(seed)
    U, V = _orthonormal(shape[0], k, gen), _orthonormal(shape[1], k, gen)
    states = {m: asvd.LayerState(U_k=U, S_k=torch.ones(k), V_k=V, analyses=1) for m in motions}
    out, prev = {m: [] for m in motions}, None
    for t in range(analyses):
        G = gradient(t, U, V, gen)
        entry = asvd.gradient_metrics(G, U, seed=t)
        for motion, state in states.items():
            dW = prev if motion == "along" else gradient(t, U, V, gen)
            p = None if dW is None else asvd.alignment(dW, U)
            metrics = {"k": k, "k_prev": k, **entry, "update_alignment_ratio": asvd.alignment_ratio(p, k, shape[0])}
            action, reason, streaks, history = asvd.judge(metrics, state, policy, step=t + 2)
            analysis = asvd.Analysis(metrics, action, reason, streaks, U, state.S_k, V, history=history)
            states[motion] = asvd.advance(state, analysis, None)
            out[motion].append((action, reason, metrics))
        prev = -G
    return out


def null_switches(shape, k, rank, analyses, seed, policy=None, motions=("along", "independent")):
    """{motion: switches into protection} over `analyses` analyses whose gradients (rank `rank`, None =
    full) are independent of the learned directions: the entry test's false alarms."""
    runs = fixed_basis_run(shape, k, lambda t, U, V, gen: draw_gradient(shape, rank, gen), analyses, motions,
                           policy, seed)
    return {m: sum(action == asvd.Action.TO_LOWRANK for action, _, _ in run) for m, run in runs.items()}


def detection_rate(shape, k, share, rest_rank, trials, seed, policy=None):
    """Share of `trials` layers that switch into protection within svd_patience analyses of a gradient
    holding `share` of its energy in the top-k block (the rest of rank `rest_rank`, None = Gaussian)."""
    policy = policy or asvd.SVDPolicy()
    hits = 0
    for trial in range(trials):
        run = fixed_basis_run(shape, k, lambda t, U, V, gen: aligned_gradient(U, V, share, rest_rank, gen),
                              policy.svd_patience, ("independent",), policy, seed=seed * 100_003 + trial)
        hits += any(action == asvd.Action.TO_LOWRANK for action, _, _ in run["independent"])
    return hits / trials


# ---------------------------------------------------------------------------------------------
# Matrices grown from zero by Muon: what a zero-initialised output projection is made of.

UPDATE_KINDS = {"gaussian": "Gaussian gradients", "lowrank": "rank-2 gradients (0.1% full-rank floor)",
                "steep": "steep-spectrum gradients (s_i = i^-2)"}


def muon_update(shape, kind, gen):
    """One Muon-style update: Newton-Schulz orthogonalisation (Muon's own) of a random gradient.
    kind (UPDATE_KINDS): 'gaussian' (full rank: a nearly orthogonal update), 'lowrank' (rank 2 plus a
    full-rank floor at 0.1% of its norm, which Newton-Schulz lifts part of the way) or 'steep' (singular
    values i^-2 in random directions: an update flat on about 30 directions, like an output projection's)."""
    n_out, n_in = shape
    if kind == "gaussian":
        G = torch.randn(n_out, n_in, generator=gen)
    elif kind == "lowrank":
        G = draw_gradient(shape, 2, gen)
        floor = torch.randn(n_out, n_in, generator=gen)
        G = G + 1e-3 * G.norm() * floor / floor.norm()
    elif kind == "steep":
        g = min(shape)
        s = torch.arange(1, g + 1, dtype=torch.float32) ** -2.0
        G = (_orthonormal(n_out, g, gen) * s) @ _orthonormal(n_in, g, gen).T
    else:
        raise ValueError(f"unknown update kind {kind!r}")
    return zeropower_via_newtonschulz5(G, dtype=torch.float32)


def grown_from_zero(shape, updates, kind, seed):
    """A matrix summed from zero out of `updates` independent Muon-style updates (no shared direction)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.zeros(*shape)
    for _ in range(updates):
        W += muon_update(shape, kind, gen)
    return W


def plant(W, directions, strength, seed):
    """W plus `directions` persistent directions (random orthonormal) whose singular value is `strength`
    times W's largest. Returns (the matrix, the planted left basis)."""
    gen = torch.Generator().manual_seed(seed)
    U = _orthonormal(W.shape[0], directions, gen)
    V = _orthonormal(W.shape[1], directions, gen)
    return W + strength * float(torch.linalg.matrix_norm(W, ord=2)) * U @ V.T, U
