"""Adaptive-SVD method core (DESIGN.md section 4): SVD engine, calibrated metrics, rank schedule,
switch policy and momentum transfer, as pure functions on tensors.

Notation: W is (n_out x n_in) with thin SVD W = U S V^T, g = min(n_out, n_in); the k principal (top)
and r = g - k minor (bottom) triples split W exactly into W_p + B A. The method is described in
experiments/ADAPTIVE_SVD_METHOD.md; every formula and default there is the one implemented here.
"""

import math
from dataclasses import dataclass, field, replace

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
    """Thin SVD; a wide matrix is factored through its transpose (A^T = V S U^T), which LAPACK's
    CPU path does about 2.4x faster for d20's 1280 x 5120 than the wide matrix itself."""
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
    U: torch.Tensor | None = None   # (n_out, m) fp32, m = g when complete, else the top k
    S: torch.Tensor | None = None   # (m,) fp32, descending
    Vh: torch.Tensor | None = None  # (m, n_in) fp32
    method: str = "failed"          # 'exact', 'warm' or 'failed': what actually produced the result
    complete: bool = False          # True when all g triples are present (exact)
    frob_sq: float | None = None    # ||W||_F^2, so energy shares work from a top-k result too
    residual: float | None = None   # warm only: ||W V_k - U_k S_k||_F / ||S_k||_F
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


def _warm_unusable(W, prev, k):
    """Why a warm start is impossible for this call (a short reason), or None."""
    g = min(W.shape)
    if prev is None or not prev.ok:
        return "no previous SVD"
    if prev.U.shape[0] != W.shape[0] or prev.Vh.shape[1] != W.shape[1]:
        return "previous SVD has another shape"
    if k is None or not 1 <= k < g:
        return f"k={k} not in [1, g-1]"
    return None


def _warm_topk(W, prev, k, iters, oversample, seed):
    """Top-k triples by block subspace iteration started from the previous right basis.

    Start block X: the previous top-k right vectors (random where the previous result had fewer)
    plus `oversample` seeded random columns, which a power step turns towards any dominant direction
    the previous basis misses (so a bad start shows up as a large residual instead of passing as
    exact triples of the wrong subspace). Then Q = orth(W X), `iters` steps Q <- orth(W orth(W^T Q)),
    and Rayleigh-Ritz: W^T Q = X R gives Q^T W = R^T X^T, whose small SVD yields the triples.
    Returns ((U, S, Vh) or None when the small SVD fails, notes).
    """
    n_out, n_in = W.shape
    l = min(k + oversample, min(n_out, n_in))
    X = prev.Vh[:k].T.to(W.device, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    X = torch.cat([X, torch.randn(n_in, l - X.shape[1], generator=gen).to(W.device)], dim=1)
    Q = _orth(W @ X)
    for _ in range(iters):
        Q = _orth(W @ _orth(W.T @ Q))
    X, R = _linalg(torch.linalg.qr, W.T @ Q)
    small, notes = _exact(R.T)
    if small is None:
        return None, notes
    Ur, S, Vrh = small
    return (Q @ Ur[:, :k], S[:k], (X @ Vrh[:k].T).T), notes


def _noting_device(res, W):
    if W.device.type in _CPU_LINALG_DEVICE_TYPES:
        res.notes.append(f"device {W.device.type} lacks linear algebra kernels: computed on a CPU copy")
    return res


def svd(W, method="exact", prev=None, k=None, *, iters=1, oversample=16, tol=0.02,
        auto_exact_max_dim=512, auto_warm_max_share=0.25, seed=0):
    """SVD of a weight matrix in fp32, never raising on bad data and never returning NaN.

    method: 'exact' = full thin SVD (complete=True); 'warm' = top-k triples only (complete=False)
    by subspace iteration from `prev` (an earlier SVDResult of a matrix of the same shape),
    accepted when residual = ||W V_k - U_k S_k||_F / ||S_k||_F <= tol, else an exact SVD;
    'auto' = warm when min(W.shape) > auto_exact_max_dim, k <= auto_warm_max_share * g and a
    usable previous result exists, exact otherwise (warm costs grow with k: at k ~ g/2 it is no
    faster than exact, scripts/bench_svd.py). Non-finite input gives a failed result; convergence errors retry with another
    driver, then float64 on CPU; if all fail, a failed result. Results are on W's device even where
    the SVD itself had to run on CPU (MPS).
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
    why_not_warm = _warm_unusable(W, prev, k)
    if method == "auto":
        g = min(W.shape)
        warm_pays = g > auto_exact_max_dim and k is not None and k <= auto_warm_max_share * g
        method = "warm" if warm_pays and not why_not_warm else "exact"
    if method == "warm" and why_not_warm:
        notes.append(f"warm start impossible ({why_not_warm}): exact SVD")
    elif method == "warm":
        try:
            warm, warm_notes = _warm_topk(W, prev, k, iters, oversample, seed)
        except RuntimeError as e:
            warm, warm_notes = None, [f"warm SVD failed: {_first_line(e)}"]
        notes += warm_notes
        if warm is not None:
            U, S, Vh = warm
            s_norm = float(S.norm())
            residual = float((W @ Vh.T - U * S).norm()) / max(s_norm, 1e-30)
            if s_norm > 0 and residual <= tol:
                frob_sq = float(torch.linalg.vector_norm(W)) ** 2
                return _noting_device(SVDResult(U, S, Vh, "warm", False, frob_sq, residual, notes), W)
            notes.append(f"warm result rejected (residual {residual:.2e} > tol {tol:g}): exact SVD")
    triples, exact_notes = _exact(W)
    notes += exact_notes
    if triples is None:
        return _noting_device(SVDResult(notes=notes, reason="; ".join(exact_notes)), W)
    U, S, Vh = triples
    return _noting_device(SVDResult(U, S, Vh, "exact", True, _energy(S), None, notes), W)



# ---------------------------------------------------------------------------------------------
# Metrics (DESIGN.md 4.3). All return Python floats/ints, or None where the quantity is undefined
# (zero or non-finite input): never NaN, so a JSON log line and a decision can always be made.

def _finite(x):
    return x if x is not None and math.isfinite(x) else None


def alignment(G, U):
    """||U^T G||_F / ||G||_F: the share of G's norm lying in span(U), U (n_out x m) orthonormal.

    With U = U_k this is the principal alignment p. For a random G (i.i.d. entries) E[p^2] = m / n_out,
    so compare it through `alignment_ratio`. None when G is zero or non-finite.
    """
    G = G.detach().float()
    g_norm = _finite(float(torch.linalg.matrix_norm(G)))
    if not g_norm:
        return None
    p = _finite(float(torch.linalg.matrix_norm(U.detach().float().T @ G)) / g_norm)
    return None if p is None else min(p, 1.0)


def minor_alignment(G, U_m):
    """||U_m^T G||_F / ||G||_F with U_m the bottom r left singular vectors; random G: E[.^2] = r / n_out."""
    return alignment(G, U_m)


def alignment_ratio(p, k, n_out):
    """p^2 / (k / n_out): principal alignment against its random-G baseline E[p^2] = k / n_out.

    1 = no preference, > 1 = G concentrated on the top-k directions. Its ceiling is n_out / k
    (all of G inside span(U_k)), so a threshold above n_out / k can never be reached.
    """
    return None if p is None else p * p * n_out / k


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


def minor_spectrum_change(S_minor_prev, S_minor_now):
    """||S_now - S_prev|| / ||S_prev|| over the bottom min(r_prev, r_now) singular values of each
    (when r changed, the values still compared are the smallest ones of both). None when S_prev = 0."""
    m = min(S_minor_prev.numel(), S_minor_now.numel())
    if m == 0:
        return None
    prev = S_minor_prev.detach().cpu().double()[-m:]
    now = S_minor_now.detach().cpu().double()[-m:]
    denom = float(prev.norm())
    return float((now - prev).norm()) / denom if denom > 0 else None


def _range_basis(X):
    """Orthonormal basis of the column span of X, dropping numerically null directions (rank-deficient X).
    A QR is enough (and several times cheaper) when R's diagonal shows full column rank; else an SVD."""
    X = X.detach().float()
    if X.shape[0] >= X.shape[1] > 0:
        Q, R = _linalg(torch.linalg.qr, X)
        d = R.diagonal().abs()
        if float(d.min()) > float(d.max()) * max(X.shape) * 1e3 * torch.finfo(torch.float32).eps:
            return Q
    U, S, _ = _linalg(_thin_svd, X)
    if S.numel() == 0 or float(S[0]) == 0:
        return U[:, :0]
    keep = S > S[0] * max(X.shape) * torch.finfo(torch.float32).eps
    return U[:, keep]


def trainable_fraction(G, B, A):
    """Share of ||G||_F^2 that training the factors B (n_out x r) and A (r x n_in) can follow.

    Moving B and A changes B A to first order by dB A + B dA, whose reachable set is the tangent space
    of rank-r matrices at B A: {P_B X + Y P_A}. The fraction is ||P_B G + G P_A - P_B G P_A||_F^2 /
    ||G||_F^2 with P_B the projector onto span(B) and P_A onto the row span of A, evaluated as
    ||Q_B^T G||^2 + ||G Q_A||^2 - ||Q_B^T G Q_A||^2 with orthonormal bases Q_B, Q_A (robust to rank
    deficiency). Random G: 1 - (1 - r/n_out)(1 - r/n_in), see `trainable_fraction_baseline`.
    None when G is zero or non-finite.
    """
    G = G.detach().float()
    total = _finite(float(torch.linalg.matrix_norm(G)) ** 2)
    if not total:
        return None
    Q_B, Q_A = _range_basis(B), _range_basis(A.T)
    left, right = Q_B.T @ G, G @ Q_A
    reach = left.square().sum() + right.square().sum() - (left @ Q_A).square().sum()
    frac = _finite(float(reach) / total)
    return None if frac is None else min(max(frac, 0.0), 1.0)


def trainable_fraction_baseline(r, n_out, n_in):
    """Expected trainable_fraction of a random G for rank-r factors: 1 - (1 - r/n_out)(1 - r/n_in)."""
    return 1 - (1 - r / n_out) * (1 - r / n_in)


def choose_k(S, principal_energy, total=None, g=None):
    """k_min: smallest k whose top-k singular values hold `principal_energy` of ||W||_F^2, in [1, g-1].

    S: descending singular values, all g of them, or the top ones with total = ||W||_F^2 and g given;
    None when those top values do not reach the target (an exact SVD is then needed) or W = 0.
    """
    g = S.numel() if g is None else g
    k = effective_rank(S, principal_energy, total)
    return None if k is None else min(max(k, 1), g - 1)


def layer_metrics(res, r, G=None, dW=None, prev_U_k=None, prev_minor_S=None, B=None, A=None):
    """Every metric of one analysis of one layer, as a JSON-ready dict (keys as in the write-up).

    res: this analysis' SVDResult; r: the minor rank that would be used (k = g - r principal);
    G: gradient of W_eff; dW: W_eff(now) - W_eff(previous analysis); prev_U_k: previous top-k left
    basis; prev_minor_S: previous bottom singular values; B, A: the low-rank factors (low-rank mode).
    Quantities whose inputs are absent (or need the full spectrum when res is a warm top-k result) are None.
    """
    n_out, n_in = res.U.shape[0], res.Vh.shape[1]
    k = min(n_out, n_in) - r
    if not 1 <= k <= res.S.numel():
        raise ValueError(f"r={r} gives k={k}, but the SVD result has {res.S.numel()} triples")
    U_k = res.U[:, :k]
    U_m = res.U[:, k:] if res.complete else None
    m = {"k": k, "r": r}
    for prefix, X in (("", G), ("update_", dW)):
        p = alignment(X, U_k) if X is not None else None
        m[prefix + "principal_alignment"] = p
        m[prefix + "minor_alignment"] = minor_alignment(X, U_m) if X is not None and U_m is not None else None
        m[prefix + "alignment_ratio"] = alignment_ratio(p, k, n_out)
    angle = overlap = above = None
    if prev_U_k is not None:
        angle, overlap = principal_angles(prev_U_k, U_k)
        above = overlap_above_chance(overlap, prev_U_k.shape[1], k, n_out)
    m.update(subspace_angle=angle, subspace_overlap=overlap, subspace_overlap_above_chance=above)
    m["reconstruction_error"] = reconstruction_error(res.S, k, res.frob_sq)
    m["effective_rank_95"] = effective_rank(res.S, 0.95, res.frob_sq)
    m["effective_rank_99"] = effective_rank(res.S, 0.99, res.frob_sq)
    m["stable_rank"] = stable_rank(res.S, res.frob_sq)
    m["minor_spectrum_change"] = (minor_spectrum_change(prev_minor_S, res.S[k:])
                                  if prev_minor_S is not None and res.complete else None)
    low_rank = B is not None and A is not None
    m["trainable_fraction"] = trainable_fraction(G, B, A) if low_rank and G is not None else None
    m["trainable_fraction_baseline"] = trainable_fraction_baseline(r, n_out, n_in) if low_rank else None
    return m


# ---------------------------------------------------------------------------------------------
# Rank schedule (DESIGN.md 4.5)

def initial_rank(g, k_min):
    """r when a layer enters low-rank mode: g - k_min, so the frozen principal part starts at k_min."""
    return g - k_min


def next_rank(r, minor_change, *, r_min, r_max, decay=0.8, tol=0.1):
    """Geometric rank schedule: floor(r * decay) when the minor spectrum changed less than tol since
    the previous analysis, ceil(r / decay) when more, r when exactly tol or unknown (None: no previous
    spectrum). Clamped to [r_min, r_max] with r_max = g - k_min; when r_min > r_max, r_max wins,
    since it is what keeps k >= k_min >= 1.
    """
    if minor_change is not None and minor_change < tol:
        r = math.floor(r * decay)
    elif minor_change is not None and minor_change > tol:
        r = math.ceil(r / decay)
    return min(max(r, r_min), r_max)


# ---------------------------------------------------------------------------------------------
# Decision policy (DESIGN.md 4.4)

TO_LOWRANK, TO_FULL, KEEP = "to_lowrank", "to_full", "keep"


@dataclass
class SVDPolicy:
    """Every threshold of the method; field names are the CLI flags. Reasoning: ADAPTIVE_SVD_METHOD.md."""
    svd_warmup_steps: int = 0               # no switch before this step
    svd_ratio_danger: float = 2.0           # alignment_ratio (gradient or update) that means clobbering risk
    svd_overlap_stable: float = 0.9         # subspace_overlap_above_chance that counts as a stable subspace
    svd_reconstruction_max: float = 0.95    # largest reconstruction_error at the proposed r for that switch
    svd_trainable_fraction_min: float = 0.5 # share of ||G||^2 the low-rank factors must be able to follow
    svd_angle_max: float = 0.5              # radians of principal-subspace rotation tolerated in low rank
    svd_patience: int = 2                   # bad analyses in a row before going back to full; analyses
                                            # a layer keeps its mode after any switch
    svd_rank_decay: float = 0.8             # geometric rank schedule factor
    svd_minor_change_tol: float = 0.1       # relative minor-spectrum change: below shrinks r, above grows it
    svd_rank_min: int = 8                   # lower bound of r
    svd_principal_energy: float = 0.15      # share of ||W||_F^2 held by the principal part (sets k_min)


@dataclass
class LayerSVDState:
    """Per-layer tracking between analyses. `decide` reads it; `advance_state` updates mode and counters;
    the caller stores r and the previous tensors (dataclasses.replace)."""
    mode: str = "full"                          # 'full' or 'lowrank'
    r: int | None = None                        # minor rank in use (low-rank) or last proposed
    prev_U_k: torch.Tensor | None = None        # top-k left singular vectors at the previous analysis
    prev_W: torch.Tensor | None = None          # W_eff at the previous analysis, for dW
    prev_minor_S: torch.Tensor | None = None    # bottom-r singular values at the previous analysis
    analyses: int = 0                           # analyses recorded so far; the current one has this index
    last_switch: int | None = None              # index of the analysis that last switched the mode
    bad_count: int = 0                          # consecutive low-rank analyses failing a low-rank check

    @property
    def has_baseline(self):
        return self.analyses > 0

    @property
    def analyses_since_switch(self):
        return None if self.last_switch is None else self.analyses - self.last_switch


def _at_least(metrics, key, threshold):
    value = metrics.get(key)
    return value is not None and value >= threshold


def _full_mode_trigger(metrics, policy):
    if (_at_least(metrics, "alignment_ratio", policy.svd_ratio_danger)
            or _at_least(metrics, "update_alignment_ratio", policy.svd_ratio_danger)):
        return "gradient_clobbering_risk"
    recon = metrics.get("reconstruction_error")
    if (_at_least(metrics, "subspace_overlap_above_chance", policy.svd_overlap_stable)
            and recon is not None and recon <= policy.svd_reconstruction_max):
        return "optimal_lowrank_conditions"
    return None


def lowrank_trouble(metrics, policy):
    """The low-rank check a layer fails at this analysis (a reason), or None."""
    frac = metrics.get("trainable_fraction")
    if frac is not None and frac < policy.svd_trainable_fraction_min:
        return "lowrank_cannot_follow_gradient"
    angle = metrics.get("subspace_angle")
    if angle is not None and angle > policy.svd_angle_max:
        return "principal_subspace_rotated"
    return None


def decide(metrics, state, policy, step):
    """(action, reason) for one layer at one analysis; action in {'to_lowrank', 'to_full', 'keep'}.

    metrics: the `layer_metrics` dict (a missing or None metric never triggers a rule). In order:
    no baseline yet -> keep 'initial_svd_baseline'; step < svd_warmup_steps -> keep 'warmup';
    full: alignment_ratio or update_alignment_ratio >= svd_ratio_danger -> 'gradient_clobbering_risk',
    else subspace_overlap_above_chance >= svd_overlap_stable and reconstruction_error <=
    svd_reconstruction_max -> 'optimal_lowrank_conditions'; low-rank: a `lowrank_trouble` reason
    at svd_patience consecutive analyses (this one included) -> to_full. A switch within
    svd_patience analyses of the previous switch is held: keep 'hysteresis_hold:<reason>'.
    Otherwise keep 'continue_current_mode'.
    """
    if not state.has_baseline:
        return KEEP, "initial_svd_baseline"
    if step < policy.svd_warmup_steps:
        return KEEP, "warmup"
    if state.mode == "full":
        target, reason = TO_LOWRANK, _full_mode_trigger(metrics, policy)
    else:
        target, reason = TO_FULL, lowrank_trouble(metrics, policy)
        if state.bad_count + 1 < policy.svd_patience:
            reason = None
    if reason is None:
        return KEEP, "continue_current_mode"
    since = state.analyses_since_switch
    if since is not None and since <= policy.svd_patience:
        return KEEP, f"hysteresis_hold:{reason}"
    return target, reason


def advance_state(state, action, metrics, policy):
    """The state after this analysis: counts it, applies a switch, tracks consecutive low-rank trouble.
    r and the prev_* tensors are the caller's to set."""
    if action == KEEP:
        trouble = state.mode == "lowrank" and lowrank_trouble(metrics, policy) is not None
        return replace(state, analyses=state.analyses + 1, bad_count=state.bad_count + 1 if trouble else 0)
    mode = {TO_LOWRANK: "lowrank", TO_FULL: "full"}[action]
    return replace(state, mode=mode, analyses=state.analyses + 1, last_switch=state.analyses, bad_count=0)


# ---------------------------------------------------------------------------------------------
# Optimizer momentum across a switch (DESIGN.md 4.7)

def momentum_to_lowrank(M_W, B, A):
    """(M_B, M_A) = (M_W A^T, B^T M_W): the chain rule applied to the momentum, as dL/dB = G A^T and
    dL/dA = B^T G for W_eff = W_p + B A."""
    B, A = B.to(M_W.dtype), A.to(M_W.dtype)
    return M_W @ A.T, B.T @ M_W


def momentum_to_full(M_B, M_A, B, A):
    """M_W = M_B A + B M_A: the first-order change of B A that momenta (M_B, M_A) produce. Composed with
    `momentum_to_lowrank` it maps M_W to M_W A^T A + B B^T M_W, a matrix in the tangent space at B A."""
    B, A = B.to(M_B.dtype), A.to(M_B.dtype)
    return M_B @ A + B @ M_A
