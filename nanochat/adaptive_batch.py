"""The analysis of many layers at once on their device: the same analysis as adaptive_svd.analyze (the
reference, one layer at a time, which tests/test_adaptive_batch.py holds this to), arranged for a GPU.

Matrices of one shape whose SVD is of one kind (exact, or warm with one block width: see
adaptive_svd.warm_width) form a group, and each stage runs once per group on the stacked matrices: the
projection off the protected directions, the SVD (subspace iteration and Rayleigh-Ritz, or the exact
one), the count of learned directions (adaptive_svd.count_learned_batch), the warm result's certificate
and every metric, from the factors already in hand, with the gradient's top energies
(adaptive_svd.gradient_energies_batch). Nothing is read back per matrix: the host learns which results
were certified (and each count) in one transfer for all groups, and every metric in one more, from which
it computes the entry test's p-value (adaptive_svd.gradient_figures) as the reference does. The linear algebra kernels
that check their convergence flags (svd, svdvals, eigvalsh) wait for the device once per group. A matrix whose
result the certificate rejects, that is not finite or whose group's kernels fail is redone by the
reference analyze, alone, with its notes and retries. The decision is the reference's `judge`, on the
host.
"""

import math
import time
from dataclasses import dataclass

import torch

from nanochat import adaptive_svd as asvd
from nanochat.adaptive_svd import Analysis, Mode
from nanochat.host_sync import host_side

# the metrics of adaptive_svd.layer_metrics computed on the device (the host derives the gradient's and the
# update's other figures from the two alignments); the integer ones are logged as ints
METRICS = ("principal_alignment", "update_principal_alignment", "subspace_angle", "subspace_overlap",
           "subspace_overlap_above_chance", "reconstruction_error", "effective_rank_95", "effective_rank_99",
           "stable_rank", "s_max", "blocked_fraction")
INTEGER = ("effective_rank_95", "effective_rank_99")


@dataclass
class Job:
    """One layer's analysis, as planned on the host before anything runs."""
    W: torch.Tensor              # fp32
    G: torch.Tensor | None
    state: asvd.LayerState
    kp: int                      # protected directions (0 in full mode)
    k_max: int                   # room for new learned directions: the clamp (or the dial) minus kp, at least 0
    dial: bool                   # --svd_protect_frac sets k (k_max of them), not the count
    prev_V: torch.Tensor         # the warm start, n_in x j
    kind: str                    # 'warm' or 'exact', or 'reference' (done alone by adaptive_svd.analyze)
    width: int                   # columns of the SVD: the warm block's, or g for an exact one
    iters: int                   # subspace iterations of a warm block

    @property
    def key(self):
        return tuple(self.W.shape), self.kind, self.width, self.iters


def plan(W, G, state, policy, method):
    """The Job of one layer: what the reference analyze would run for it."""
    W = W.detach().float()
    n_out, n_in = W.shape
    g = min(n_out, n_in)
    protected = state.mode == Mode.LOWRANK and state.U_k is not None and state.U_k.shape[1] > 0
    kp = state.U_k.shape[1] if protected else 0
    dial = asvd.protect_k(g, policy)
    k_room = max((dial if dial else asvd.k_max(g, policy)) - kp, 0)
    prev_V = W.new_zeros(n_in, 0) if state.warm_V is None else state.warm_V
    kind = asvd.choose_method("exact" if dial else method, W.shape, prev_V)
    if kind == "warm" and not asvd.usable_start(prev_V, W.shape):
        kind = "reference"  # the reference notes why and takes the exact SVD
    width = asvd.warm_width(g, prev_V.shape[1], k_room) if kind == "warm" else g
    return Job(W, None if G is None else G.detach().float(), state, kp, k_room, bool(dial), prev_V, kind, width,
               asvd.warm_iters(prev_V.shape[1]))


def _ints(rows, device):
    """Host integers (a list of equal-length lists) as an int64 tensor on `device`, copied without waiting
    for the device's queue (a copy from pinned memory)."""
    t = torch.tensor(rows, dtype=torch.int64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _padded(mats, rows, cols, like):
    """A (len(mats), rows, cols) stack of the given (rows x c) matrices, zero columns after each one's c
    (None = all zero): zero columns change no projection, norm or singular value computed from them."""
    out = like.new_zeros(len(mats), rows, cols)
    for b, M in enumerate(mats):
        if M is not None and M.shape[1]:
            out[b, :, :M.shape[1]] = M
    return out


def _top_singular(Z):
    """The largest singular value of each thin matrix of a batch Z (B, n, c), as the root of the top
    eigenvalue of its small Gram matrix Z^T Z (c x c, in float64): as accurate as an SVD for the top
    value, and a batched Jacobi on a GPU, where the SVD of a tall matrix runs one matrix at a time."""
    Z = Z.double()
    return asvd._linalg(torch.linalg.eigvalsh, Z.mT @ Z)[:, -1].clamp(min=0.0).sqrt()


def _certify(T, U, S, Vh, k, threshold, clamped, seed):
    """adaptive_svd.certify_warm for a batch, on the device: (accepted (B,) bool). The deflated matrix
    A = (I - U_k U_k^T) T is applied as an operator (never formed)."""
    B, L = S.shape
    cols = torch.arange(L, device=S.device) < k[:, None]
    U_k, V_k, S_k = U * cols[:, None, :], Vh.mT * cols[:, None, :], S * cols

    def deflate(Z):  # (I - U_k U_k^T) Z
        return Z - U_k @ (U_k.mT @ Z)

    A = lambda Y: deflate(T @ Y)
    At = lambda Z: T.mT @ deflate(Z)
    Y = asvd._orth(A(asvd.gaussian(T.shape[-1], asvd.CERT_PROBES, seed + 1, T.device)))
    for _ in range(asvd.ITERS):
        Y = asvd._orth(A(asvd._orth(At(Y))))
    probe = _top_singular(At(Y))  # the top singular value of Y^T A
    below = S.gather(1, k.clamp(max=L - 1)[:, None])[:, 0]
    s_next = torch.maximum(torch.where(k < L, below, torch.zeros_like(below)).double(), probe)
    missed = (s_next > threshold.nan_to_num(0.0)) & ~clamped  # NaN: the block's values are all zero
    r1 = (T @ V_k - U_k * S_k[:, None, :]).square().sum((-2, -1))
    r2 = (T.mT @ U_k - V_k * S_k[:, None, :]).square().sum((-2, -1))
    gap = S.gather(1, (k - 1).clamp(min=0)[:, None])[:, 0].double() - s_next
    bound = torch.where(gap > 0, (r1 + r2).double().sqrt() / gap, torch.full_like(gap, math.inf))
    return ~missed & ((k == 0) | (bound <= asvd.CERT_TOL))


def _spectra(jobs, step, policy):
    """The SVD of every job of one group and its count: a dict of batched device tensors."""
    W = torch.stack([j.W for j in jobs])  # a NaN spreads to its own results only, or fails the group's SVD
    B, n_out, n_in = W.shape
    kp = max(j.kp for j in jobs)
    U_p = _padded([j.state.U_k if j.kp else None for j in jobs], n_out, kp, W)
    V_p = _padded([j.state.V_k if j.kp else None for j in jobs], n_in, kp, W)
    T = asvd.project(W, U_p, V_p)
    if jobs[0].kind == "warm":
        R = asvd.gaussian(n_in, jobs[0].width, step, W.device)  # the reference seeds every layer's start alike
        X = torch.stack([asvd.start_block(j.prev_V.to(W.device), R) for j in jobs])
        Q, Y, R = asvd.subspace_iteration(T, X, jobs[0].iters)
        Ur, S, Vrh = asvd._linalg(torch.linalg.svd, R.mT)
        U, Vh = Q @ Ur, (Y @ Vrh.mT).mT
        frob = torch.linalg.vector_norm(T, dim=(-2, -1), dtype=torch.float64).square()
    else:
        U, S, Vh = asvd._linalg(asvd._thin_svd, T)
        frob = S.double().square().sum(-1)
    finite = torch.isfinite(U).all(-1).all(-1) & torch.isfinite(S).all(-1) & torch.isfinite(Vh).all(-1).all(-1) \
        & torch.isfinite(frob)
    g, k_max = _ints([[min(n_out, n_in) - j.kp for j in jobs], [j.k_max for j in jobs]], W.device)
    learned, threshold = asvd.count_learned_batch(S.double(), g, policy.svd_gap)
    k = torch.minimum(learned, k_max)
    ok = finite & (learned >= 0)
    if jobs[0].kind == "warm":
        ok &= _certify(T, U, S, Vh, k.clamp(min=0), threshold, learned > k_max, step)
    S_p = (U_p.mT @ W @ V_p).diagonal(dim1=-2, dim2=-1)  # the protected singular values (zero columns: zeros)
    return dict(W=W, U=U, S=S, Vh=Vh, frob=frob, k=k, learned=learned, threshold=threshold, ok=ok, U_p=U_p, V_p=V_p,
                S_p=S_p)


def _norm2(X):
    """||X||_F^2 of each matrix of a batch, accumulated in float64 (as adaptive_svd._norm)."""
    return torch.linalg.vector_norm(X, dim=(-2, -1), dtype=torch.float64).square()


def _metrics(jobs, t, k_new, step):
    """The METRICS of one group's certified jobs (rows of `t`, the group's tensors) as a (B, columns)
    float64 tensor, NaN where the reference gives None, then the columns the host needs for the entry
    test: G finite (1/0), ||G||_F^2 and G's top energies (adaptive_svd.gradient_energies_batch)."""
    dev = t["W"].device
    B, n_out, n_in = t["W"].shape
    nan = torch.full((B,), math.nan, dtype=torch.float64, device=dev)
    prev = [0 if j.state.U_k is None else j.state.U_k.shape[1] for j in jobs]
    kp, kn, k_prev, has_g, has_dw, exact = _ints([[j.kp for j in jobs], k_new, prev, [j.G is not None for j in jobs],
                                                  [j.state.W_prev is not None for j in jobs],
                                                  [j.kind == "exact" for j in jobs]], dev)
    has_g, has_dw, exact = has_g.bool(), has_dw.bool(), exact.bool()
    k_now = kp + kn
    Kn = max(max(k_new), 1)
    new = torch.arange(Kn, device=dev) < kn[:, None]
    U_new, S_new = t["U"][:, :, :Kn] * new[:, None, :], t["S"][:, :Kn] * new
    U_now = torch.cat([t["U_p"], U_new], dim=2)
    S_k = torch.cat([t["S_p"], S_new], dim=1).double()
    Kprev = max(max(prev), 1)
    U_prev = _padded([j.state.U_k for j in jobs], n_out, Kprev, t["W"])
    V_prev = _padded([j.state.V_k for j in jobs], n_in, Kprev, t["W"])
    out = []

    def alignment(Xs, given):
        """p, minor, ratio of each X against U_prev (NaN where the reference has None)."""
        X = torch.stack([t["W"].new_zeros(n_out, n_in) if X is None else X for X in Xs])
        x2 = _norm2(X)
        p = (_norm2(U_prev.mT @ X) / x2).sqrt().clamp(max=1.0)
        valid = given & (k_prev > 0) & torch.isfinite(x2) & (x2 > 0) & torch.isfinite(p)
        p = torch.where(valid, p, nan)
        return [p], X, x2

    grad, G, g2 = alignment([j.G for j in jobs], has_g)
    update, _, _ = alignment([None if j.state.W_prev is None else j.W - j.state.W_prev for j in jobs], has_dw)
    out += grad + update
    # principal angles between span(U_prev) and span(U_now): A is the smaller basis, B the other
    smaller_prev = k_prev <= k_now
    K = max(Kprev, U_now.shape[2])
    Up = torch.nn.functional.pad(U_prev, (0, K - Kprev))
    Un = torch.nn.functional.pad(U_now, (0, K - U_now.shape[2]))
    A = torch.where(smaller_prev[:, None, None], Up, Un)
    Bb = torch.where(smaller_prev[:, None, None], Un, Up)
    M = Bb.mT @ A
    cos = asvd._linalg(torch.linalg.svdvals, M).clamp(0.0, 1.0).double()
    m = torch.minimum(k_prev, k_now)
    real = torch.arange(K, device=dev) < m[:, None]
    overlap = (cos.square() * real).sum(-1) / m.clamp(min=1)
    c_min = cos.gather(1, (m - 1).clamp(min=0)[:, None])[:, 0]
    sin_max = _top_singular(A - Bb @ M).clamp(0.0, 1.0)
    angle = torch.where(c_min.square() < 0.5, torch.acos(c_min), torch.asin(sin_max))
    both = (k_prev > 0) & (k_now > 0)
    base = torch.maximum(k_prev, k_now).double() / n_out
    above = (overlap - base) / (1 - base)
    out += [torch.where(both, angle, nan), torch.where(both, overlap, nan), torch.where(both & (base < 1), above, nan)]
    # the spectrum: the protected values with the analysed matrix' (sorted as the reference's S_all)
    total = t["frob"] + t["S_p"].double().square().sum(-1)
    positive = total > 0
    kept = (total - S_k.square().sum(-1)).clamp(min=0)
    out.append(torch.where(positive, (kept / total).sqrt(), nan))
    S_all = torch.cat([t["S_p"], t["S"]], dim=1).double().sort(dim=1, descending=True).values
    known = exact | (kn > 0)
    cum = S_all.square().cumsum(-1)
    for energy in (0.95, 0.99):
        below = (cum < energy * total[:, None]).sum(-1)
        reached = below < S_all.shape[1]
        out.append(torch.where(known & positive & reached, (below + 1).double(), nan))
    s_max = S_all[:, 0]
    out.append(torch.where(known & (s_max > 0), total / s_max.square(), nan))
    out.append(torch.where(known, s_max, nan))
    # what the protection in force removes from G: ||P(G)||^2 = ||G||^2 - ||U^T G||^2 - ||G V||^2 + ||U^T G V||^2
    UtG = U_prev.mT @ G
    kept_g = g2 - _norm2(UtG) - _norm2(G @ V_prev) + _norm2(UtG @ V_prev)
    blocked = (1 - kept_g / g2).clamp(0.0, 1.0)
    protected = (kp > 0) & has_g & (k_prev > 0)
    out.append(torch.where(protected & torch.isfinite(g2) & (g2 > 0) & torch.isfinite(blocked), blocked, nan))
    # the entry test's inputs: a non-finite G has none (zeros in its place keep the group's SVD from failing)
    finite = has_g & torch.isfinite(G).all(-1).all(-1)
    energies, total = asvd.gradient_energies_batch(torch.where(finite[:, None, None], G, 0.0), seed=step)
    return torch.cat([torch.stack(out + [finite.double(), total], dim=1), energies], dim=1)


def _rows(t, keep, B):
    """The rows `keep` of every tensor of a group (all of them: the tensors themselves)."""
    if len(keep) == B:
        return t
    index = _ints([keep], t["W"].device)[0]
    return {name: v.index_select(0, index) for name, v in t.items()}


def analyze_many(layers, policy, step, method="exact", stop=None):
    """The Analysis of every (W, G, state) in `layers`, in order: what adaptive_svd.analyze gives for each
    (within rounding), computed group by group on the device. Each Analysis' `seconds` holds its share of
    the batched stages (svd, metrics, decision): its group's time over the group's size, plus an even share
    of the read-backs and the decisions; a job redone by the reference has the reference's own.
    `stop()` is asked before each group and each job done alone: True abandons the analysis (None)."""
    t0 = time.perf_counter()
    jobs = [plan(W, G, state, policy, method) for W, G, state in layers]
    groups = {}
    for i, job in enumerate(jobs):
        if job.kind != "reference":
            groups.setdefault(job.key, []).append(i)
    tensors, alone = {}, [i for i, job in enumerate(jobs) if job.kind == "reference"]
    spent = {}  # group -> its own seconds in the svd and metrics stages
    for key, idx in groups.items():
        if stop is not None and stop():
            return None
        t_group = time.perf_counter()
        try:
            tensors[key] = _spectra([jobs[i] for i in idx], step, policy)
        except RuntimeError:  # a kernel of the batch failed (e.g. no convergence): each matrix alone, with retries
            alone += idx
        spent[key] = {"svd": time.perf_counter() - t_group, "metrics": 0.0}
    # the SVD stage's one transfer: which results stand (finite, counted, certified) and their k
    flags = torch.cat([torch.stack([t["ok"].long(), t["k"], t["learned"]]) for t in tensors.values()],
                      dim=1).tolist() if tensors else [[], [], []]
    kept, col = {}, 0
    for key, t in tensors.items():
        idx = groups[key]
        ok, ks, learned = (row[col:col + len(idx)] for row in flags)
        col += len(idx)
        alone += [i for i, good in zip(idx, ok) if not good]
        rows = [r for r, good in enumerate(ok) if good]
        if rows:
            static = policy.svd_policy == "static"
            # the dial sets k; OSFT: a protected layer's basis stays as it was chosen (as in the reference)
            k_new = [0 if static and jobs[idx[r]].kp else jobs[idx[r]].k_max if jobs[idx[r]].dial else ks[r]
                     for r in rows]
            kept[key] = (rows, k_new, [learned[r] for r in rows], _rows(t, rows, len(idx)))
    t_svd = time.perf_counter()
    tables = []
    for key, (rows, k_new, _, t) in kept.items():
        t_group = time.perf_counter()
        tables.append(torch.cat([t["threshold"][:, None], _metrics([jobs[groups[key][r]] for r in rows], t, k_new, step)],
                                dim=1))
        spent[key]["metrics"] = time.perf_counter() - t_group
    values = torch.cat(tables).tolist() if tables else []  # the metrics stage's one transfer
    t_metrics = time.perf_counter()
    out = [None] * len(jobs)
    row = 0
    device_note = [f"device {jobs[0].W.device.type} lacks linear algebra kernels: computed on a CPU copy"] \
        if jobs and jobs[0].W.device.type in asvd._CPU_LINALG_DEVICE_TYPES else []
    for key, (rows, k_new, learned, t) in kept.items():
        for b, (r, kn, ln) in enumerate(zip(rows, k_new, learned)):
            i = groups[key][r]
            out[i] = _analysis(jobs[i], t, b, kn, ln, values[row], policy, step, device_note)
            row += 1
    t_decision = time.perf_counter()
    batched = len(jobs) - len(alone)
    stages = {"svd": t_svd - t0, "metrics": t_metrics - t_svd, "decision": t_decision - t_metrics}
    shared = {stage: stages[stage] - sum(g.get(stage, 0.0) for g in spent.values()) for stage in stages}
    for key, idx in groups.items():
        for i in idx:
            if out[i] is not None:
                out[i].seconds = {stage: spent[key].get(stage, 0.0) / len(idx) + shared[stage] / batched
                                  for stage in stages}
    for i in alone:
        if stop is not None and stop():
            return None
        job = jobs[i]
        out[i] = asvd.analyze(job.W, job.G, job.state, policy, step, method=method)
    return out


def analyze_each(layers, policy, step, method="exact", stop=None):
    """analyze_many's interface, one layer at a time through the reference: what a CPU runs, where nothing
    waits on a device queue and the batches' extra copies would only cost time."""
    out = []
    for W, G, state in layers:
        if stop is not None and stop():
            return None
        out.append(asvd.analyze(W, G, state, policy, step, method=method))
    return out


def _analysis(job, t, b, k_new, learned, values, policy, step, notes):
    """One certified job's Analysis from row b of its group's tensors, its count and its row of values
    (the threshold, METRICS, then the entry test's inputs: see _metrics)."""
    state = job.state
    n_out, n_in = job.W.shape
    U, S, V = t["U"][b, :, :k_new], t["S"][b, :k_new], t["Vh"][b, :k_new].mT
    if job.kp:
        U = torch.cat([state.U_k, U], dim=1)
        S = torch.cat([t["S_p"][b, :job.kp], S])
        V = torch.cat([state.V_k, V], dim=1)
    k_prev = None if state.U_k is None else state.U_k.shape[1]
    n = len(METRICS)
    threshold, (finite, total), energies = values[0], values[n + 1:n + 3], values[n + 3:]
    read = {name: None if math.isnan(v) else (int(v) if name in INTEGER else v) for name, v in zip(METRICS, values[1:])}
    p, update = read.pop("principal_alignment"), read.pop("update_principal_alignment")
    m = {"k": job.kp + k_new, "k_prev": k_prev}
    with host_side():  # the entry test's p-value, from numbers already read back
        m.update(asvd.gradient_figures(p, k_prev or 0, n_out, min(n_out, n_in),
                                       torch.tensor(energies, dtype=torch.float64), total) if finite else
                 asvd.gradient_figures(p, k_prev or 0, n_out, None, None, None))
    m.update(asvd.alignment_figures(update, k_prev or 0, n_out, prefix="update_"), **read)
    blocked = job.kp > 0 and job.G is not None and bool(k_prev)
    m["blocked_fraction_baseline"] = asvd.blocked_fraction_baseline(k_prev, n_out, n_in) if blocked else None
    m.update(k_learned=job.kp + learned, k_clamped=not job.dial and learned > job.k_max,
             bulk_threshold=None if math.isnan(threshold) else threshold)
    action, reason, streaks, history = asvd.judge(m, state, policy, step)
    left_out = max(learned - k_new, 0)
    rest = t["Vh"][b, k_new:k_new + max(left_out, asvd.OVERSAMPLE)].mT
    return Analysis(m, action, reason, streaks, U.contiguous(), S.contiguous(), V.contiguous(),
                    warm_V=asvd.next_start(V, rest, left_out, action.mode_after(state.mode)), history=history,
                    method=job.kind, notes=list(notes))
