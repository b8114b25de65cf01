"""Adaptive-SVD method core, as pure functions on tensors: the SVD engine, the count of learned
directions, the metrics, the entry test (the gradient's alignment against its null) and the decision
rules (one table, thresholds declared once).

Notation: W is (n_out x n_in) with thin SVD W = U S V^T, g = min(n_out, n_in). The k principal
(learned) directions are the singular values that stand apart from the rest of the spectrum; r = g - k
is the rank that trains in low-rank (protected) mode, where every update is confined to
(I - U_k U_k^T) dW (I - V_k V_k^T). The method and every default: experiments/ADAPTIVE_SVD_METHOD.md.
"""

import dataclasses
import enum
import math
import statistics
from dataclasses import dataclass, field

import torch

# ---------------------------------------------------------------------------------------------
# SVD engine

# Device types whose linear-algebra kernels raised NotImplementedError (MPS has no SVD). Later calls
# on such a device go straight to a CPU copy instead of failing first every time.
_CPU_LINALG_DEVICE_TYPES = set()


def _linalg(fn, *tensors):
    """fn(*tensors); where the device lacks the operator, run it on CPU copies and move outputs back."""
    device = tensors[0].device
    if device.type not in _CPU_LINALG_DEVICE_TYPES:
        try:
            return fn(*tensors)
        except NotImplementedError:
            _CPU_LINALG_DEVICE_TYPES.add(device.type)
    out = fn(*(t.to("cpu", copy=True) for t in tensors))
    if isinstance(out, tuple):
        return tuple(o.to(device) for o in out)
    return out.to(device)


def _thin_svd(A, **kwargs):
    """Thin SVD; a wide matrix is factored through its transpose (A^T = V S U^T): LAPACK's CPU path is
    faster on the tall orientation (experiments/ADAPTIVE_SVD_METHOD.md, "SVD engine")."""
    if A.shape[0] < A.shape[1]:
        U, S, Vh = torch.linalg.svd(A.mT, full_matrices=False, **kwargs)
        return Vh.mT, S, U.mT
    return torch.linalg.svd(A, full_matrices=False, **kwargs)


def _orth(Y):
    """Orthonormal basis of the column span of Y (Householder QR)."""
    return _linalg(torch.linalg.qr, Y)[0]


def _first_line(err):
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _energy(S):
    """sum S^2 as a Python float, accumulated in float64 on CPU (S has at most g entries)."""
    return float(S.detach().cpu().double().square().sum())


@dataclass
class SVDResult:
    """Outcome of `svd`. On failure (method == 'failed') U, S, Vh are None and `reason` says why."""
    U: torch.Tensor | None = None   # (n_out, m) fp32: m = g when complete, else the top m (warm)
    S: torch.Tensor | None = None   # (m,) fp32, descending
    Vh: torch.Tensor | None = None  # (m, n_in) fp32
    method: str = "failed"          # 'exact', 'warm' or 'failed': what actually produced the result
    complete: bool = False          # True when all g triples are present (exact)
    frob_sq: float | None = None    # ||W||_F^2, so energy shares work from a top-m result too
    notes: list = field(default_factory=list)  # fallbacks taken, in order, for the log
    reason: str | None = None       # why it failed

    @property
    def ok(self):
        return self.method != "failed"


def _exact(W):
    """Thin SVD of fp32 W with the retry chain: default driver (CPU copy on devices without SVD),
    then CUDA's gesvd, then float64 on CPU. Returns ((U, S, Vh) or None, notes)."""
    notes = []
    attempts = [("default driver", lambda: _linalg(_thin_svd, W))]
    if W.is_cuda:
        # gesvd is slower than the default gesvdj/gesvda but converges where they do not
        attempts.append(("gesvd driver", lambda: _thin_svd(W, driver="gesvd")))
    attempts.append(("float64 on CPU", lambda: _thin_svd(W.cpu().double())))
    for name, attempt in attempts:
        try:
            U, S, Vh = attempt()
        except RuntimeError as e:  # torch.linalg.LinAlgError (no convergence) is a RuntimeError
            notes.append(f"svd ({name}) failed: {_first_line(e)}")
            continue
        if all(bool(torch.isfinite(t).all()) for t in (U, S, Vh)):
            return tuple(t.float().to(W.device) for t in (U, S, Vh)), notes
        notes.append(f"svd ({name}) returned non-finite values")
    return None, notes


def _warm_block(W, prev_V, oversample, iters, seed):
    """Top triples of W by block subspace iteration from the previous right basis `prev_V` (n_in x j).

    Start block X = [prev_V, `oversample` seeded random columns], Q = orth(W X), then `iters` steps
    Q <- orth(W orth(W^T Q)), then Rayleigh-Ritz: the QR W^T Q = X R gives Q^T W = R^T X^T, whose small
    SVD yields l = j + oversample triples with U^T W = S V^T exact by construction. Returns
    ((U, S, Vh) or None when the small SVD fails, notes).
    """
    n_out, n_in = W.shape
    l = min(prev_V.shape[1] + oversample, min(n_out, n_in))
    gen = torch.Generator().manual_seed(seed)
    X = torch.cat([prev_V.to(W.device, torch.float32),
                   torch.randn(n_in, l - prev_V.shape[1], generator=gen).to(W.device)], dim=1)
    Q = _orth(W @ X)
    for _ in range(iters):
        Q = _orth(W @ _orth(W.T @ Q))
    X, R = _linalg(torch.linalg.qr, W.T @ Q)
    small, notes = _exact(R.T)
    if small is None:
        return None, notes
    Ur, S, Vrh = small
    return (Q @ Ur, S, (X @ Vrh.T).T), notes


def svd(W, method="exact", prev_V=None, *, oversample=16, iters=2, auto_exact_max_dim=128, auto_random_min_dim=512,
        seed=0):
    """SVD of a weight matrix in fp32, never raising on bad data and never returning NaN.

    method: 'exact' = full thin SVD (complete=True); 'warm' = the top l = j + oversample triples only
    (complete=False) by subspace iteration from `prev_V` (n_in x j, the previous analysis' top right
    vectors; j may be 0); 'auto' = warm when `prev_V` fits W, min(W.shape) > auto_exact_max_dim and
    either prev_V holds learned directions or min(W.shape) > auto_random_min_dim; exact otherwise (below
    auto_exact_max_dim the exact SVD costs no more than a certified warm one; without learned directions
    to start from, the exact SVD's full spectrum is worth its cost up to auto_random_min_dim;
    `python -m scripts.bench_svd` measures both). A warm result is only a candidate: `count_learned` and `certify_warm` decide
    whether it may be used (`spectrum` does both). Non-finite input gives a failed result;
    convergence errors retry with another driver, then float64 on CPU; if all fail, a failed result.
    Results are on W's device even where the SVD itself had to run on CPU (MPS).
    """
    if W.ndim != 2:
        raise ValueError(f"svd expects a matrix, got shape {tuple(W.shape)}")
    if method not in ("exact", "warm", "auto"):
        raise ValueError(f"unknown SVD method {method!r}; use exact, warm or auto")
    W = W.detach().float()  # fp32 always: there is no bf16/fp16 SVD, and fp32 is the accuracy we report
    if W.numel() == 0:
        return SVDResult(reason="empty matrix")
    bad = int((~torch.isfinite(W)).sum())
    if bad:
        return SVDResult(reason=f"non-finite input: {bad} NaN/Inf entries")
    notes = []
    usable = prev_V is not None and prev_V.ndim == 2 and prev_V.shape[0] == W.shape[1]
    if method == "auto":
        # warm needs learned directions to start from; a start without any is a randomized SVD whose
        # top values stay lower bounds, worth it only where the exact SVD is expensive
        g = min(W.shape)
        warm_pays = usable and g > auto_exact_max_dim and (prev_V.shape[1] > 0 or g > auto_random_min_dim)
        method = "warm" if warm_pays else "exact"
    if method == "warm" and not usable:
        notes.append("warm start impossible (no previous basis of this shape): exact SVD")
    elif method == "warm":
        try:
            warm, warm_notes = _warm_block(W, prev_V, oversample, iters, seed)
        except RuntimeError as e:
            warm, warm_notes = None, [f"warm SVD failed: {_first_line(e)}"]
        notes += warm_notes
        if warm is not None:
            U, S, Vh = warm
            frob_sq = float(torch.linalg.vector_norm(W.double())) ** 2
            return _noting_device(SVDResult(U, S, Vh, "warm", False, frob_sq, notes), W)
    triples, exact_notes = _exact(W)
    notes += exact_notes
    if triples is None:
        return _noting_device(SVDResult(notes=notes, reason="; ".join(exact_notes)), W)
    U, S, Vh = triples
    return _noting_device(SVDResult(U, S, Vh, "exact", True, _energy(S), notes), W)


def _noting_device(res, W):
    if W.device.type in _CPU_LINALG_DEVICE_TYPES:
        res.notes.append(f"device {W.device.type} lacks linear algebra kernels: computed on a CPU copy")
    return res


# singular values below a candidate gap that the bulk's edge scale is fitted to
GAP_WINDOW = 8
# relative spacing below which two singular values count as tied (fp32 SVD accuracy), not as a gap
_TIE = 1e-5


def count_learned(S, g, gap):
    """(learned, threshold): how many singular values stand apart from the rest of the spectrum.

    The rest (the bulk) may be any continuum: a Gaussian matrix's Marchenko-Pastur law, or the
    flat-topped spectrum of a matrix grown from zero by Muon's orthogonalised updates, which no single
    noise law describes. What such continua share is a soft top edge, where the j-th value sits near
    E - beta j^(2/3) (the Tracy-Widom spacing). So for each candidate i the edge scale beta_i is fitted
    by least squares to the GAP_WINDOW values below s_i, and s_1..s_i are learned when
    s_i - s_{i+1} >= gap * beta_i; `learned` is the deepest such i in the top half of the spectrum
    (0 if none). threshold: the value a direction above the bulk would need to count,
    s_{learned+1} + gap * beta there. Scale-free, and it needs only the top values: a warm top-m
    result sees candidates up to m - GAP_WINDOW - 1, and gets learned = None when that is none.
    g: the dimension of the space W lives in (a complete spectrum has g values).
    """
    S = S.detach().cpu().double()
    m = S.numel()
    last = min(g // 2, m - GAP_WINDOW - 1)  # the deepest candidate whose window lies inside S
    if m < g and last < 1:
        return None, None
    if last < 0 or not S[0] > 0:
        return 0, None  # a tiny or zero matrix: nothing stands apart
    x = torch.arange(1, GAP_WINDOW + 1, dtype=torch.float64) ** (2 / 3)
    x -= x.mean()
    windows = S.unfold(0, GAP_WINDOW, 1)[: last + 1]  # row i: s_{i+1} .. s_{i+GAP_WINDOW}
    beta = -((windows - windows.mean(1, keepdim=True)) @ x) / (x @ x)
    scale = beta.clamp_min(_TIE * float(S[0]))
    hits = torch.nonzero(S[:last] - S[1:last + 1] >= gap * scale[1:])
    learned = int(hits[-1]) + 1 if len(hits) else 0
    return learned, float(S[learned] + gap * scale[learned])


def certify_warm(W, res, k, threshold, clamped=False, *, tol=0.02, probes=8, iters=2, seed=0):
    """(accepted, why) for using the top-k of a warm result `res` of W with learned-count threshold.

    Two checks that a wrong start basis cannot pass:
    1. Nothing that would count as learned was missed (unless k was `clamped`, when more are expected):
       s_next = max(S_{k+1} of the block, a Ritz estimate of ||(I - U_k U_k^T) W||_2 from `probes`
       fresh random vectors and `iters` power steps) must be <= threshold. A top direction the start
       basis missed keeps its full size in that deflated matrix, so the probes find it.
    2. The top-k subspace is accurate: the Rayleigh-Ritz residual sqrt(||W V_k - U_k S_k||_F^2 +
       ||W^T U_k - V_k S_k||_F^2) over the gap S_k - s_next (Wedin's sin-theta bound) <= tol, so the
       captured top-k energy is >= about 1 - tol^2.
    """
    W = W.detach().float()
    U_k, S_k, V_k = res.U[:, :k], res.S[:k], res.Vh[:k].T
    A = W - U_k @ (U_k.T @ W) if k else W
    gen = torch.Generator().manual_seed(seed + 1)
    Y = _orth(A @ torch.randn(W.shape[1], probes, generator=gen).to(W.device))
    for _ in range(iters):
        Y = _orth(A @ _orth(A.T @ Y))
    probe = float(_linalg(torch.linalg.svdvals, Y.T @ A)[0])
    s_next = max(float(res.S[k]) if res.S.numel() > k else 0.0, probe)
    if s_next > threshold and not clamped:
        return False, f"a direction above the bulk threshold was missed ({s_next:.4g} > {threshold:.4g})"
    if k == 0:
        return True, "no direction above the bulk threshold"
    r1 = float((W @ V_k - U_k * S_k).norm())
    r2 = float((W.T @ U_k - V_k * S_k).norm())
    gap = float(S_k[-1]) - s_next
    bound = math.hypot(r1, r2) / gap if gap > 0 else math.inf
    if bound > tol:
        return False, f"sin-theta bound {bound:.2e} > tol {tol:g}"
    return True, f"sin-theta bound {bound:.2e}"


def spectrum(W, method, prev_V, g, *, gap, k_max, seed=0, auto_exact_max_dim=128):
    """(SVDResult, k, learned, threshold) of W: the SVD, its count of learned directions (`learned`,
    see `count_learned`) and that count clamped to k_max (`k`), a warm result used only when it is
    certified. A warm result whose only fault is an inaccurate top-k subspace (the sin-theta bound)
    gets one more round of two iterations, started from its own block; otherwise, or if that fails
    too, an exact SVD, with the reasons in the notes.
    g: the dimension of the space W lives in (g - k_p for a matrix already projected off k_p
    protected directions)."""
    res = svd(W, method, prev_V, auto_exact_max_dim=auto_exact_max_dim, seed=seed)
    if res.method == "warm":
        notes = list(res.notes)
        for attempt in range(2):
            learned, threshold = count_learned(res.S, g, gap)
            if learned is None:
                why = f"{res.S.numel()} warm values are too few to find the bulk's edge"
                break
            k = min(learned, k_max)
            accepted, why = certify_warm(W, res, k, threshold, clamped=learned > k_max, seed=seed)
            if accepted:
                res.notes = notes + ([f"certified after {2 * (attempt + 1)} iterations"] if attempt else [])
                return res, k, learned, threshold
            if attempt or not why.startswith("sin-theta"):
                break
            refined = svd(W, "warm", res.Vh[:learned].T, seed=seed + 7)
            if refined.method != "warm":
                break
            notes += refined.notes
            res = refined
        notes.append(f"warm result rejected ({why}): exact SVD")
        res = svd(W, "exact")
        res.notes = notes + res.notes
    if not res.ok:
        return res, None, None, None
    learned, threshold = count_learned(res.S, g, gap)
    return res, min(learned, k_max), learned, threshold


# ---------------------------------------------------------------------------------------------
# Metrics. All return Python floats/ints, or None where the quantity is undefined (zero or
# non-finite input, no previous basis): never NaN, so a JSON line and a decision can always be made.

def _finite(x):
    return x if x is not None and math.isfinite(x) else None


def alignment(G, U):
    """||U^T G||_F / ||G||_F: the share of G's norm lying in span(U), U (n_out x m) orthonormal.

    For a G whose direction is independent of U (random), E[p^2] = m / n_out, so compare it through
    `alignment_ratio`. None when G is zero or non-finite, or U has no columns.
    """
    if U is None or U.shape[1] == 0:
        return None
    G = G.detach().float()
    g_norm = _finite(float(torch.linalg.matrix_norm(G)))
    if not g_norm:
        return None
    p = _finite(float(torch.linalg.matrix_norm(U.detach().float().T @ G)) / g_norm)
    return None if p is None else min(p, 1.0)


def alignment_ratio(p, k, n_out):
    """p^2 / (k / n_out): principal alignment against its random baseline E[p^2] = k / n_out.

    1 = no preference, > 1 = concentrated on the k directions. Its ceiling is n_out / k, which the
    clamp k <= g / 10 keeps at >= 10. None when p is None or k = 0 (nothing learned: no ratio)."""
    return None if p is None or not k else p * p * n_out / k


def project(X, U, V):
    """(I - U U^T) X (I - V V^T): X with its components along the principal bases removed, in fp32.
    The one projection of the method: protected training (the optimizer, through AdaptiveSVDLinear)
    and the analysis both call it."""
    X = X.float()
    if U is None or U.shape[1] == 0:
        return X  # full mode, or nothing protected: X itself, so k = 0 trains exactly as full mode
    X = X - U @ (U.T @ X)
    return X - (X @ V) @ V.T


def blocked_fraction(G, U, V):
    """Share of ||G||_F^2 that protection with bases U (n_out x k), V (n_in x k) removes:
    1 - ||(I - U U^T) G (I - V V^T)||^2 / ||G||^2. Random G: 1 - (1 - k/n_out)(1 - k/n_in)."""
    G = G.detach().float()
    total = _finite(float(torch.linalg.matrix_norm(G)) ** 2)
    if not total:
        return None
    kept = float(torch.linalg.matrix_norm(project(G, U, V))) ** 2
    return _finite(min(max(1.0 - kept / total, 0.0), 1.0))


def blocked_fraction_baseline(k, n_out, n_in):
    """Expected `blocked_fraction` of a random G: 1 - (1 - k/n_out)(1 - k/n_in)."""
    return 1 - (1 - k / n_out) * (1 - k / n_in)


def principal_angles(U_prev, U_now):
    """(largest principal angle in radians, subspace_overlap = mean cos^2 of all principal angles)
    between span(U_prev) and span(U_now), both with orthonormal columns (the dimensions may differ:
    there are min(k_prev, k_now) angles, measuring how far the smaller subspace lies outside the larger).

    Cosines are the singular values of U_prev^T U_now clamped to [0, 1]. Small angles lose accuracy
    through arccos, so when every cos^2 >= 1/2 the largest angle is taken from the sines, the singular
    values of A - B (B^T A) with A the smaller basis (as scipy.linalg.subspace_angles does).
    Random subspaces: E[overlap] = max(k_prev, k_now) / n, see `overlap_above_chance`.
    """
    A, B = U_prev.detach().float(), U_now.detach().float()
    if A.shape[1] > B.shape[1]:
        A, B = B, A
    M = B.T @ A
    cos = _linalg(torch.linalg.svdvals, M).clamp(0.0, 1.0).cpu().double()
    overlap = float(cos.square().mean())
    c_min = float(cos[-1])
    if c_min * c_min < 0.5:
        return math.acos(c_min), overlap
    sin_max = float(_linalg(torch.linalg.svdvals, A - B @ M)[0].clamp(0.0, 1.0))
    return math.asin(sin_max), overlap


def overlap_above_chance(overlap, k_prev, k_now, n):
    """(overlap - b) / (1 - b) with b = max(k_prev, k_now) / n, the expected overlap of random
    subspaces: 0 = no more similar than chance, 1 = identical. None when b >= 1 (a subspace is all of R^n)."""
    b = max(k_prev, k_now) / n
    if overlap is None or b >= 1:
        return None
    return (overlap - b) / (1 - b)


def reconstruction_error(S, k, total=None):
    """||W - W_k||_F / ||W||_F = sqrt(sum_{i>k} S_i^2 / sum_i S_i^2), W_k the top-k part.

    S: descending singular values, all of them, or only the top ones (>= k) with total = ||W||_F^2.
    None when W = 0.
    """
    total = _energy(S) if total is None else total
    if not total > 0:
        return None
    return math.sqrt(max(total - _energy(S[:k]), 0.0) / total)


def effective_rank(S, energy=0.95, total=None):
    """Smallest count of top singular values holding `energy` of sum S^2 (report 0.95 and 0.99).

    With a partial S (top values only, total = ||W||_F^2) None when they do not reach it; None when W = 0.
    """
    total = _energy(S) if total is None else total
    if not total > 0:
        return None
    cum = S.detach().cpu().double().square().cumsum(0)
    hit = torch.nonzero(cum >= energy * total)
    return int(hit[0]) + 1 if len(hit) else None


def stable_rank(S, total=None):
    """||W||_F^2 / ||W||_2^2 = sum S^2 / S_max^2 (between 1 and g). None when W = 0."""
    total = _energy(S) if total is None else total
    s_max = float(S.max()) if S.numel() else 0.0
    return total / (s_max * s_max) if s_max > 0 else None


# ---------------------------------------------------------------------------------------------
# The entry test: how surprising is the gradient's alignment if its directions are unrelated to the
# learned ones? Write G = sum_i s_i a_i b_i^T and w_i = s_i^2 / ||G||^2. Then
# p^2 = sum_i w_i ||U_k^T a_i||^2, and for a direction a independent of U_k each ||U_k^T a||^2 is
# Beta(k/2, (n_out - k)/2). The null law of p^2 therefore depends on k, n_out and G's spectrum (its
# effective rank): a rank-1 G gives exactly that Beta law, a G spread over many directions a tight one.

def gradient_energies(G, top=32, oversample=8, iters=2, seed=0):
    """(the top squared singular values of G, descending, float64 on CPU; ||G||_F^2): exact for a small
    G, else from a seeded randomized block (`top` + `oversample` columns, `iters` power iterations,
    Rayleigh-Ritz), which is exact for gradients of rank up to top + oversample and otherwise gives
    lower bounds of the top values (`alignment_pvalue` treats the rest conservatively)."""
    G = G.detach().float()
    total = float(torch.linalg.vector_norm(G.double())) ** 2
    if min(G.shape) <= top + oversample:
        s = _linalg(torch.linalg.svdvals, G)
    else:
        gen = torch.Generator().manual_seed(seed)
        Q = _orth(G @ torch.randn(G.shape[1], top + oversample, generator=gen).to(G.device))
        for _ in range(iters):
            Q = _orth(G @ _orth(G.T @ Q))
        s = _linalg(torch.linalg.svdvals, Q.T @ G)
    return s[:top].detach().cpu().double().square(), total


def _upper_tail(a, nu):
    """P(sum_j a_j X_j >= 0) for independent X_j ~ chi^2(nu_j), by the Lugannani-Rice saddlepoint
    approximation (within a few percent in the far tail: tested against SciPy's Beta law and a
    numerical inversion of the characteristic function). a, nu: 1-D float64 tensors, nu > 0."""
    if not bool((a > 0).any()):
        return 0.0
    if not bool((a < 0).any()):
        return 1.0

    def cgf(t):  # the cumulant generating function of the sum and its first two derivatives
        d = 1 - 2 * a * t
        return (float(-0.5 * (nu * torch.log(d)).sum()), float((nu * a / d).sum()),
                float((2 * nu * a * a / (d * d)).sum()))

    # the saddlepoint K'(t) = 0: K' increases on the domain 1 - 2 a_j t > 0, so Newton inside a bracket
    lo, hi = 1 / (2 * float(a.min())), 1 / (2 * float(a.max()))
    t = 0.0
    for _ in range(200):
        _, k1, k2 = cgf(t)
        lo, hi = (lo, t) if k1 > 0 else (t, hi)
        t_next = t - k1 / k2
        if not lo < t_next < hi:
            t_next = (lo + hi) / 2
        done = abs(t_next - t) <= 1e-13 * max(1.0, abs(t))
        t = t_next
        if done:
            break
    k0, _, k2 = cgf(t)
    w = math.copysign(math.sqrt(max(-2 * k0, 0.0)), t)
    if abs(w) < 1e-5:  # the mean sits at 0: the formula's limit, 1/2 less a skewness term
        c2, c3 = float((2 * nu * a * a).sum()), float((8 * nu * a ** 3).sum())
        return min(max(0.5 - c3 / (6 * math.sqrt(2 * math.pi) * c2 ** 1.5), 0.0), 1.0)
    u = t * math.sqrt(k2)
    tail = 0.5 * math.erfc(w / math.sqrt(2)) + math.exp(-0.5 * w * w) / math.sqrt(2 * math.pi) * (1 / u - 1 / w)
    return min(max(tail, 0.0), 1.0)


def alignment_pvalue(p, k, n_out, g, energies, total):
    """P(alignment >= p) for a gradient whose directions are unrelated to the k learned ones: the
    p-value of the entry test. energies: G's top squared singular values, total = ||G||_F^2,
    g = min(G.shape) (G has at most g directions), n_out: the length of U_k's columns.

    With k independent random directions in place of U_k's columns (the pooled form), p^2 >= x reads
    sum_i (w_i - x/k) chi^2_k,i >= 0 over G's n_out left directions (w_i = 0 beyond its rank): exact
    for k = 1 whatever G, and for a G spread evenly over every direction; for larger k the p-value is
    conservative (for a rank-1 G at k/n_out = 0.1 it reads up to twice the exact Beta tail at 1e-3).
    The energy beyond the known top values is spread at the smallest known value's level, as
    concentrated as it can be, so an incomplete spectrum can only raise the p-value.
    None when p is None or k = 0.
    """
    if p is None or not k or not total > 0:
        return None
    x = p * p
    w = energies / total
    weights = w[w > 0].tolist()
    counts = [1] * len(weights)
    used, rest = len(weights), 1.0 - sum(weights)
    if weights and rest > 1e-12 and used < g:
        level = weights[-1]
        copies = min(int(rest / level), g - used)
        if copies:
            weights.append(level)
            counts.append(copies)
            used, rest = used + copies, rest - copies * level
        if rest > 1e-12 and used < g:
            weights.append(rest)
            counts.append(1)
            used += 1
    weights.append(0.0)
    counts.append(n_out - used)
    a = torch.tensor(weights, dtype=torch.float64) - x / k
    nu = k * torch.tensor(counts, dtype=torch.float64)
    return _upper_tail(a[nu > 0], nu[nu > 0])


def gradient_metrics(G, U_prev, seed=0):
    """The entry statistic of one analysis: this step's gradient G against the previous analysis' basis
    U_prev (n_out x k; None = none yet). principal_alignment p, minor_alignment sqrt(1 - p^2),
    alignment_ratio p^2 / (k / n_out) (the readable figure), alignment_p (its p-value under the null,
    `alignment_pvalue`) and gradient_stable_rank ||G||_F^2 / ||G||_2^2. None where undefined.
    seed: the randomized block's (the step, so that a resumed run repeats it)."""
    k = 0 if U_prev is None else U_prev.shape[1]
    p = None if G is None else alignment(G, U_prev)
    m = {"principal_alignment": p, "minor_alignment": None if p is None else math.sqrt(max(1.0 - p * p, 0.0)),
         "alignment_ratio": None if p is None else alignment_ratio(p, k, U_prev.shape[0]),
         "alignment_p": None, "gradient_stable_rank": None}
    if G is not None and bool(torch.isfinite(G).all()):
        energies, total = gradient_energies(G, seed=seed)
        if total > 0:
            m["gradient_stable_rank"] = total / float(energies[0])
            m["alignment_p"] = alignment_pvalue(p, k, G.shape[0], min(G.shape), energies, total)
    return m


def alignment_shift(ratio, history, window):
    """The alignment against the layer's own normal: `ratio` over the median of the last `window`
    gradient alignment ratios the layer read in full mode (`history`). None until `window` exist."""
    if ratio is None or len(history) < window:
        return None
    base = statistics.median(history[-window:])
    return ratio / base if base > 0 else None


def layer_metrics(S, frob_sq, k, U_now, G=None, dW=None, U_prev=None, V_prev=None, protected=False, S_k=None,
                  seed=0):
    """Every metric of one analysis of one layer, as a JSON-ready dict (keys as in the write-up).

    S: W's singular values, descending (all, or the top ones with frob_sq = ||W||_F^2), or None when
    they are not known accurately (a warm result that found nothing learned holds lower bounds only:
    the spectrum-shape metrics are then None); k: learned directions now, U_now their left basis,
    S_k their singular values (default: the top k of S). G: this step's gradient; dW: W(now) - W(previous analysis);
    U_prev, V_prev: the basis chosen at the previous analysis, which every alignment is measured
    against (the directions learned before the update happened, so dW cannot bias its own metric);
    protected: that basis was the protection in force (low-rank mode), which adds `blocked_fraction`.
    """
    n_out, n_in = U_now.shape[0], (V_prev.shape[0] if V_prev is not None else None)
    k_prev = 0 if U_prev is None else U_prev.shape[1]
    m = {"k": k, "k_prev": k_prev if U_prev is not None else None}
    m.update(gradient_metrics(G, U_prev, seed=seed))
    p = alignment(dW, U_prev) if dW is not None else None  # the update is logged, not a decision input
    m.update(update_principal_alignment=p, update_minor_alignment=None if p is None else math.sqrt(max(1.0 - p * p, 0.0)),
             update_alignment_ratio=alignment_ratio(p, k_prev, n_out))
    angle = overlap = above = None
    if k_prev and k:
        angle, overlap = principal_angles(U_prev, U_now[:, :k])
        above = overlap_above_chance(overlap, k_prev, k, n_out)
    m.update(subspace_angle=angle, subspace_overlap=overlap, subspace_overlap_above_chance=above)
    S_k = S[:k] if S_k is None else S_k
    m["reconstruction_error"] = reconstruction_error(S_k, k, frob_sq)
    for key, f in (("effective_rank_95", lambda: effective_rank(S, 0.95, frob_sq)),
                   ("effective_rank_99", lambda: effective_rank(S, 0.99, frob_sq)),
                   ("stable_rank", lambda: stable_rank(S, frob_sq)), ("s_max", lambda: float(S[0]) if S.numel() else None)):
        m[key] = None if S is None else f()
    blocked = protected and G is not None and k_prev > 0
    m["blocked_fraction"] = blocked_fraction(G, U_prev, V_prev) if blocked else None
    m["blocked_fraction_baseline"] = blocked_fraction_baseline(k_prev, n_out, n_in) if blocked else None
    return m


# ---------------------------------------------------------------------------------------------
# Policy: every threshold, declared once. Each field is also a command-line flag of the training
# script (nanochat/adaptive_cycle.py derives them), with its help line and its valid range here, in
# the plain metadata nanochat.cli.flag writes (this module imports no command-line or training code):
# the parser and nanochat.cli.check_config apply them and the CHECKS between fields.

def _knob(default, help, valid, rule):
    return field(default=default, metadata={"help": help, "valid": valid, "rule": rule})


POLICIES = ("adaptive", "shift", "static", "observe")


@dataclass
class SVDPolicy:
    svd_policy: str = _knob("adaptive", "adaptive: protect a layer while its gradient is significantly aligned with "
                            "what it learned (the test) | shift: while that alignment is also well above the layer's "
                            "own recent normal | static: protect every target from the first step on, never leave "
                            "(OSFT; continues a trained checkpoint, --init_from) | observe: analyse and log, never "
                            "switch", lambda v: v in POLICIES, ", ".join(POLICIES))
    svd_alpha: float = _knob(1e-3, "per-analysis false-alarm rate of the entry test: a layer is at clobbering risk when "
                             "its gradient's alignment has a p-value at or below this under the null (directions "
                             "unrelated to the learned ones)", lambda v: 0 < v < 1, "in (0, 1)")
    svd_exit_p: float = _knob(0.1, "a protected layer's risk has passed when its gradient's alignment p-value is at or "
                              "above this (no longer significant)", lambda v: 0 < v < 1, "in (0, 1)")
    svd_patience: int = _knob(2, "consecutive analyses a rule must hold before the layer switches",
                              lambda v: v >= 1, ">= 1")
    svd_warmup_steps: int = _knob(0, "no switch before this step", lambda v: v >= 0, ">= 0")
    svd_shift_window: int = _knob(8, "analyses in full mode whose median gradient alignment ratio is the layer's "
                                  "normal (alignment_shift is logged from the analysis after that many)",
                                  lambda v: v >= 1, ">= 1")
    svd_shift_enter: float = _knob(3.0, "shift policy: alignment_shift (alignment ratio over the layer's normal) at or "
                                   "above which a full layer is at risk (with a significant alignment)",
                                   lambda v: v > 1, "> 1")
    svd_shift_exit: float = _knob(1.5, "shift policy: alignment_shift at or below which a protected layer's risk has "
                                  "passed", lambda v: v > 0, "> 0")
    svd_gap: float = _knob(4.0, "a singular value is learned when it and those above it stand apart from the rest by "
                           "a gap of at least this many edge scales of the values below (4: about 1 in 1000 "
                           "pure-noise matrices shows one)", lambda v: v > 0, "> 0")
    svd_k_max_frac: float = _knob(0.1, "at most this share of min(n_out, n_in) learned directions (a guard; logged "
                                  "as k_clamped when it binds)", lambda v: 0 < v <= 0.5, "in (0, 0.5]")
    svd_protect_frac: float = _knob(0.0, "protect this share of min(n_out, n_in) (the top singular directions) "
                                    "whatever the spectrum's count, beyond the clamp if asked (the dose of a "
                                    "dose-response, e.g. under static); 0 = the learned directions",
                                    lambda v: 0 <= v < 1, "in [0, 1)")
    svd_stable_rule: bool = _knob(False, "also enter low rank when the principal subspace is stable "
                                  "(optimal_lowrank_conditions; off: it is unrelated to clobbering)",
                                  lambda v: isinstance(v, bool), "true or false")
    svd_overlap_stable: float = _knob(0.9, "subspace overlap above chance that counts as stable (with --svd_stable_rule)",
                                      lambda v: 0 <= v <= 1, "in [0, 1]")

    CHECKS = (
        (lambda p: p.svd_alpha < p.svd_exit_p,
         "--svd_exit_p={svd_exit_p} must be above --svd_alpha={svd_alpha} (the band between them is what stops a "
         "layer from cycling)"),
        (lambda p: p.svd_shift_exit < p.svd_shift_enter,
         "--svd_shift_exit={svd_shift_exit} must be below --svd_shift_enter={svd_shift_enter} (the band between them "
         "is what stops a layer from cycling)"),
    )


def k_max(g, policy):
    """The clamp on learned directions: floor(svd_k_max_frac * g), at least 1."""
    return max(1, int(policy.svd_k_max_frac * g))


def protect_k(g, policy):
    """The dial: round(svd_protect_frac * g) directions (at least 1), or None when it is off."""
    return max(1, round(policy.svd_protect_frac * g)) if policy.svd_protect_frac > 0 else None


class Mode(enum.StrEnum):
    """A layer's training mode. The values are what svd_metrics.jsonl and the console carry (a str enum
    compares equal to its value, so readers of the JSONL compare with it directly)."""
    FULL = "full"        # every direction trains
    LOWRANK = "lowrank"  # protected: updates confined to the minor subspace, rank r = g - k


class Action(enum.StrEnum):
    """What an analysis does to a layer (the `action` of its svd_metrics.jsonl record)."""
    TO_LOWRANK = "to_lowrank"
    TO_FULL = "to_full"
    KEEP = "keep"
    SKIPPED = "skipped"  # no decision: the SVD failed, the layer stays as it was until the next analysis

    def mode_after(self, mode):
        """The layer's mode once this action is carried out on a layer in `mode`."""
        return {Action.TO_LOWRANK: Mode.LOWRANK, Action.TO_FULL: Mode.FULL}.get(self, mode)


@dataclass(frozen=True)
class Rule:
    """A switch: under one of `policies`, in `mode`, when every (metric, op, threshold) of `conditions`
    holds (the threshold is a field of SVDPolicy) at svd_patience consecutive analyses, take `action`.
    `opt_in`: a policy flag that must be true."""
    reason: str
    policies: tuple
    mode: Mode
    action: Action
    conditions: tuple
    opt_in: str | None = None

    def holds(self, metrics, policy):
        for metric, op, threshold in self.conditions:
            v, t = metrics.get(metric), getattr(policy, threshold)
            if v is None or not (v >= t if op == ">=" else v <= t):
                return False
        return True

    def enabled(self, policy):
        return policy.svd_policy in self.policies and (self.opt_in is None or bool(getattr(policy, self.opt_in)))


# The rule table: decide() and scripts/monitor_svd.py both read it. Order = priority. One signal enters
# and one leaves: the gradient's alignment with the previous analysis' basis (the applied update is
# logged only: when W moves along the gradient it is the same noise a second time).
RULES = (
    Rule("gradient_clobbering_risk", ("adaptive",), Mode.FULL, Action.TO_LOWRANK,
         (("alignment_p", "<=", "svd_alpha"),)),
    Rule("alignment_shift_risk", ("shift",), Mode.FULL, Action.TO_LOWRANK,
         (("alignment_shift", ">=", "svd_shift_enter"), ("alignment_p", "<=", "svd_alpha"))),
    Rule("optimal_lowrank_conditions", ("adaptive", "shift"), Mode.FULL, Action.TO_LOWRANK,
         (("subspace_overlap_above_chance", ">=", "svd_overlap_stable"),), opt_in="svd_stable_rule"),
    Rule("clobbering_risk_passed", ("adaptive",), Mode.LOWRANK, Action.TO_FULL, (("alignment_p", ">=", "svd_exit_p"),)),
    Rule("alignment_shift_passed", ("shift",), Mode.LOWRANK, Action.TO_FULL,
         (("alignment_shift", "<=", "svd_shift_exit"),)),
)


@dataclass
class LayerState:
    """What one layer carries from one analysis to the next (and into the checkpoint)."""
    mode: Mode = Mode.FULL
    U_k: torch.Tensor | None = None    # left basis of the directions learned at the previous analysis (n_out x k);
    S_k: torch.Tensor | None = None    # while low-rank it is the protection in force
    V_k: torch.Tensor | None = None    # right basis (n_in x k)
    W_prev: torch.Tensor | None = None # W at the previous analysis, for dW
    warm_V: torch.Tensor | None = None # top right vectors of the matrix analysed last time (warm start)
    streaks: dict = field(default_factory=dict)  # rule reason -> consecutive analyses it held
    analyses: int = 0                  # analyses recorded so far
    history: list = field(default_factory=list)  # the last svd_shift_window gradient alignment ratios read in full mode

    def __post_init__(self):
        self.mode = Mode(self.mode)  # a checkpoint holds the plain string

    def to_dict(self):
        # the mode as a plain string: torch.load(weights_only=True) reads no enum
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | {"mode": self.mode.value}


def decide(metrics, state, policy, step):
    """(action, reason, streaks) for one layer at one analysis.

    A layer is never switched to protect nothing: with k = 0 now a switch to low rank is a keep
    'no_learned_directions', under every policy. static: a full layer -> to_lowrank
    'static_protection' (from its very first analysis), and never back. observe: always keep
    'observe_only' (the metrics are logged, nothing switches). adaptive and shift: no baseline yet ->
    keep 'initial_svd_baseline'; nothing learned before this analysis (k_prev = 0) -> keep
    'no_learned_directions'; step < svd_warmup_steps -> keep 'warmup'. Then each enabled rule of the
    layer's mode updates its streak (+1 when it holds, else 0) and the first whose streak reaches
    svd_patience fires; otherwise keep 'continue_current_mode' (shift, before its normal exists:
    'building_shift_baseline'). A missing or None metric never holds.
    """
    if policy.svd_policy == "static":
        if state.mode == Mode.LOWRANK:
            return Action.KEEP, "static_protection", {}
        if not metrics.get("k"):
            return Action.KEEP, "no_learned_directions", {}
        return Action.TO_LOWRANK, "static_protection", {}
    if policy.svd_policy == "observe":
        return Action.KEEP, "observe_only", {}
    if state.analyses == 0:
        return Action.KEEP, "initial_svd_baseline", {}
    if not metrics.get("k_prev"):
        return Action.KEEP, "no_learned_directions", {}
    if step < policy.svd_warmup_steps:
        return Action.KEEP, "warmup", {}
    streaks = {}
    for rule in RULES:
        if rule.mode == state.mode and rule.enabled(policy):
            streaks[rule.reason] = state.streaks.get(rule.reason, 0) + 1 if rule.holds(metrics, policy) else 0
    for rule in RULES:
        if streaks.get(rule.reason, 0) >= policy.svd_patience:
            if rule.action == Action.TO_LOWRANK and not metrics.get("k"):
                return Action.KEEP, "no_learned_directions", streaks
            return rule.action, rule.reason, {}
    if policy.svd_policy == "shift" and state.mode == Mode.FULL and metrics.get("alignment_shift") is None:
        return Action.KEEP, "building_shift_baseline", streaks
    return Action.KEEP, "continue_current_mode", streaks


def judge(metrics, state, policy, step):
    """The decision part of an analysis, given the metrics of `layer_metrics`: adds alignment_shift
    (against the layer's history so far) to `metrics`, decides, and returns (action, reason, streaks,
    the history after this analysis: the gradient's alignment ratio joins it when read in full mode)."""
    ratio = metrics.get("alignment_ratio")
    metrics["alignment_shift"] = alignment_shift(ratio, state.history, policy.svd_shift_window)
    history = list(state.history)
    if state.mode == Mode.FULL and ratio is not None:
        history = (history + [ratio])[-policy.svd_shift_window:]
    return *decide(metrics, state, policy, step), history


@dataclass
class Analysis:
    """Outcome of `analyze` for one layer. On failure (`failure` set: no SVD could be computed) only
    `notes` is filled and nothing is decided."""
    metrics: dict | None = None        # every metric of the write-up, plus k_learned, k_clamped and bulk_threshold
    action: Action | None = None
    reason: str | None = None          # the rule (or why none) behind the action
    streaks: dict = field(default_factory=dict)  # rule reason -> consecutive analyses it held (empty after a switch)
    U_k: torch.Tensor | None = None    # the basis chosen now (n_out x k), its singular values and right basis:
    S_k: torch.Tensor | None = None    # the previous basis of the next analysis
    V_k: torch.Tensor | None = None
    warm_V: torch.Tensor | None = None # the analysed matrix's top right vectors (the next warm start)
    history: list = field(default_factory=list)  # the layer's alignment history after this analysis
    method: str | None = None          # the SVD that produced it: 'exact' or 'warm'
    notes: list = field(default_factory=list)  # the SVD's fallbacks, for the log
    failure: str | None = None         # why no SVD could be computed

    @property
    def ok(self):
        return self.failure is None


def analyze(W, G, state, policy, step, method="exact"):
    """One analysis of one layer (an `Analysis`); changes nothing.

    Full mode: the spectrum of W; the chosen basis is its top-k learned directions (or, with the
    protection dial, its top protect_k directions: an exact SVD then). Low-rank mode: the protected
    triples (U_p, S_p, V_p) are exact singular triples of W, so W = U_p S_p V_p^T + W_m with
    W_m = (I - U_p U_p^T) W (I - V_p V_p^T); the spectrum of W is S_p together with that of W_m, whose
    learned directions (counted in the (g - k_p)-dimensional space it lives in) join the basis:
    protected directions stay, new ones join, up to the clamp (or the dial).
    """
    W = W.detach().float()
    n_out, n_in = W.shape
    g = min(n_out, n_in)
    protected = state.mode == Mode.LOWRANK and state.U_k is not None and state.U_k.shape[1] > 0
    kp = state.U_k.shape[1] if protected else 0
    target = project(W, state.U_k, state.V_k) if protected else W
    dial = protect_k(g, policy)
    k_room = (dial if dial else k_max(g, policy)) - kp
    res, k_new, learned, threshold = spectrum(target, "exact" if dial else method, state.warm_V, g - kp,
                                              gap=policy.svd_gap, k_max=max(k_room, 0), seed=step)
    if not res.ok:
        return Analysis(notes=res.notes, failure=res.reason)
    if dial:
        k_new = max(k_room, 0)
    if policy.svd_policy == "static" and state.mode == Mode.LOWRANK:
        k_new = 0  # OSFT: the basis chosen at the first step stays as it is
    if protected:
        U_p, V_p = state.U_k, state.V_k
        S_p = (U_p.T @ W @ V_p).diagonal()  # the protected singular values, exact while protected
        U = torch.cat([U_p, res.U[:, :k_new]], 1)
        S_k = torch.cat([S_p, res.S[:k_new]])
        V = torch.cat([V_p, res.Vh[:k_new].T], 1)
        S_all = torch.cat([S_p, res.S]).sort(descending=True).values
        frob_sq = res.frob_sq + _energy(S_p)
    else:
        U, S_k, V = res.U[:, :k_new], res.S[:k_new], res.Vh[:k_new].T
        S_all, frob_sq = res.S, res.frob_sq
    k = U.shape[1]
    dW = None if state.W_prev is None else W - state.W_prev
    # a warm block that found nothing learned holds lower bounds of the top values, not the values
    known = res.complete or k_new > 0
    metrics = layer_metrics(S_all if known else None, frob_sq, k, U, G=G, dW=dW, U_prev=state.U_k, V_prev=state.V_k,
                            protected=protected, S_k=S_k, seed=step)
    metrics.update(k_learned=kp + learned, k_clamped=not dial and learned > k_room, bulk_threshold=threshold)
    action, reason, streaks, history = judge(metrics, state, policy, step)
    return Analysis(metrics, action, reason, streaks, U.contiguous(), S_k.contiguous(), V.contiguous(),
                    warm_V=res.Vh[:learned].T.contiguous(), history=history, method=res.method, notes=res.notes)


def advance(state, analysis, W):
    """The layer's state after `analysis` (a successful one) has been applied: the basis chosen now
    becomes the previous basis of the next analysis; a switch sets the mode and clears the streaks.
    W: the weight now (the next analysis' reference for dW; None keeps none)."""
    W_prev = None if W is None else W.detach().float().clone()
    return LayerState(mode=analysis.action.mode_after(state.mode), U_k=analysis.U_k, S_k=analysis.S_k,
                      V_k=analysis.V_k, W_prev=W_prev, warm_V=analysis.warm_V,
                      streaks=dict(analysis.streaks), analyses=state.analyses + 1, history=list(analysis.history))
