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
