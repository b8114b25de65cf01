"""Adaptive-SVD core: every metric against an independent reference (NumPy / SciPy / analytic cases),
the SVD engine's fallbacks and warm certificate, the learned-direction count and the decision rules.
The policy's behaviour over many analyses is in tests/test_policy.py."""

import dataclasses
import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from nanochat import adaptive_svd as asvd
from nanochat.adaptive_svd import GAP_WINDOW
from nanochat.synthetic import UPDATE_KINDS, grown_from_zero, plant, planted


pytestmark = pytest.mark.usefixtures("one_thread")


def orthonormal(n, k, seed):
    return scipy.linalg.orth(np.random.default_rng(seed).standard_normal((n, k)))


def matrix_with_spectrum(s, n_out, n_in, seed):
    """W = U diag(s) V^T with random orthonormal U, V (numpy float64) and its torch float32 copy."""
    U, V = orthonormal(n_out, len(s), seed), orthonormal(n_in, len(s), seed + 1)
    W = (U * s) @ V.T
    return W, torch.tensor(W, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# principal angles and overlap

@pytest.mark.parametrize("case", ["random", "nearly_identical", "orthogonal", "different_dims"])
def test_principal_angles_match_scipy(case):
    n = 60
    A = orthonormal(n, 8, 0)
    if case == "random":
        B = orthonormal(n, 8, 1)
    elif case == "nearly_identical":
        B = scipy.linalg.orth(A + 1e-4 * np.random.default_rng(2).standard_normal(A.shape))
    elif case == "orthogonal":
        B = scipy.linalg.null_space(A.T)[:, :8]
    else:
        B = orthonormal(n, 20, 3)
    theta = scipy.linalg.subspace_angles(A, B)  # descending
    angle, overlap = asvd.principal_angles(torch.tensor(A, dtype=torch.float32), torch.tensor(B, dtype=torch.float32))
    assert angle == pytest.approx(theta[0], abs=2e-6)
    assert overlap == pytest.approx(np.mean(np.cos(theta) ** 2), abs=1e-6)
    if case == "nearly_identical":
        assert 1e-6 < angle < 1e-3  # resolved by the sine formula, not lost to arccos
    if case == "orthogonal":
        assert angle == pytest.approx(math.pi / 2) and overlap == pytest.approx(0, abs=1e-6)


def test_overlap_above_chance_is_calibrated_on_random_subspaces():
    n, k_prev, k_now = 40, 6, 12
    overlaps = [asvd.principal_angles(torch.tensor(orthonormal(n, k_prev, 2 * i), dtype=torch.float32),
                                      torch.tensor(orthonormal(n, k_now, 2 * i + 1), dtype=torch.float32))[1]
                for i in range(300)]
    assert np.mean(overlaps) == pytest.approx(max(k_prev, k_now) / n, rel=0.05)
    assert abs(np.mean([asvd.overlap_above_chance(o, k_prev, k_now, n) for o in overlaps])) < 0.03
    assert asvd.overlap_above_chance(1.0, k_prev, k_now, n) == pytest.approx(1.0)
    assert asvd.overlap_above_chance(0.5, n, n, n) is None


# ---------------------------------------------------------------------------------------------
# spectrum metrics

def test_spectrum_metrics_match_numpy():
    rng = np.random.default_rng(0)
    W = rng.standard_normal((30, 50)) @ np.diag(np.linspace(3, 0.1, 50))
    s = np.linalg.svd(W, compute_uv=False)
    S = torch.tensor(s, dtype=torch.float32)
    share = np.cumsum(s ** 2) / np.sum(s ** 2)
    for energy in (0.5, 0.95, 0.99):
        assert asvd.effective_rank(S, energy) == int(np.searchsorted(share, energy)) + 1
    assert asvd.stable_rank(S) == pytest.approx(np.sum(s ** 2) / s[0] ** 2, rel=1e-5)
    # a top-k spectrum plus ||W||_F^2 gives the same answers, or None when it cannot reach the target
    total = float(np.sum(s ** 2))
    assert asvd.effective_rank(S[:20], 0.95, total) == asvd.effective_rank(S, 0.95)
    assert asvd.effective_rank(S[:3], 0.95, total) is None


def test_zero_matrix_metrics_are_none():
    zero = torch.zeros(5)
    assert asvd.effective_rank(zero) is None
    assert asvd.stable_rank(zero) is None and asvd.reconstruction_error(zero, 2) is None


def test_reconstruction_error_matches_direct_numpy():
    rng = np.random.default_rng(1)
    W = rng.standard_normal((40, 25))
    U, s, Vt = np.linalg.svd(W, full_matrices=False)
    S = torch.tensor(s, dtype=torch.float32)
    for k in (1, 5, 24):
        W_k = (U[:, :k] * s[:k]) @ Vt[:k]
        direct = np.linalg.norm(W - W_k) / np.linalg.norm(W)
        assert asvd.reconstruction_error(S, k) == pytest.approx(direct, rel=1e-4)
        assert asvd.reconstruction_error(S[:k], k, float(np.sum(s ** 2))) == pytest.approx(direct, rel=1e-4)


# ---------------------------------------------------------------------------------------------
# alignment

def test_alignment_analytic_cases():
    n_out, n_in, k = 20, 12, 4
    U = torch.tensor(orthonormal(n_out, n_out, 0), dtype=torch.float32)
    U_k, U_m = U[:, :k], U[:, k:]
    inside = U_k @ torch.randn(k, n_in)
    p = asvd.alignment(inside, U_k)
    assert p == pytest.approx(1.0, abs=1e-6)
    assert asvd.alignment_ratio(p, k, n_out) == pytest.approx(n_out / k, rel=1e-5)  # the ceiling
    assert asvd.alignment(inside, U_m) == pytest.approx(0.0, abs=1e-3)
    outside = U_m @ torch.randn(n_out - k, n_in)
    assert asvd.alignment(outside, U_k) == pytest.approx(0.0, abs=1e-3)
    assert asvd.alignment(outside, U_m) == pytest.approx(1.0, abs=1e-6)
    # zero or non-finite gradient: None, never NaN
    assert asvd.alignment(torch.zeros(n_out, n_in), U_k) is None
    assert asvd.alignment(torch.full((n_out, n_in), float("nan")), U_k) is None
    assert asvd.alignment_ratio(None, k, n_out) is None
    assert asvd.alignment_ratio(0.5, 0, n_out) is None  # k = 0: nothing learned, no ratio
    assert asvd.alignment(inside, U_k[:, :0]) is None


@pytest.mark.parametrize("shape", [(48, 48), (32, 96), (96, 32)])
def test_alignment_ratio_of_random_gradients_is_one(shape):
    """The defect this replaces: a raw threshold on p that random gradients pass once k/g is large.
    Calibrated, a random gradient scores 1 for every k and shape (200 draws: within 5%)."""
    n_out, n_in = shape
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(n_out, n_in, generator=gen)
    U = torch.linalg.svd(W, full_matrices=False)[0]
    g = min(shape)
    for k in (1, g // 4, g // 2, g - 1):
        ratios = [asvd.alignment_ratio(asvd.alignment(torch.randn(n_out, n_in, generator=gen), U[:, :k]), k, n_out)
                  for _ in range(200)]
        assert np.mean(ratios) == pytest.approx(1.0, abs=0.05), (shape, k)


# ---------------------------------------------------------------------------------------------
# SVD engine

def assert_matches_numpy(res, W_np, k=None):
    s = np.linalg.svd(W_np, compute_uv=False)
    k = len(s) if k is None else k
    np.testing.assert_allclose(res.S.numpy(), s[:k], rtol=1e-4, atol=1e-5 * s[0])
    assert np.all(np.isfinite(res.U.numpy())) and np.all(np.isfinite(res.Vh.numpy()))
    if res.complete:
        np.testing.assert_allclose((res.U * res.S) @ res.Vh, W_np, atol=1e-4 * s[0])
    assert res.frob_sq == pytest.approx(float(np.sum(s ** 2)), rel=1e-4)


@pytest.mark.parametrize("shape", [(30, 30), (40, 16), (16, 40)])
def test_exact_svd_matches_numpy_and_casts_to_fp32(shape):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    res = asvd.svd(W.bfloat16())
    assert res.ok and res.method == "exact" and res.complete and res.U.dtype == torch.float32
    assert res.U.shape == (shape[0], min(shape)) and res.Vh.shape == (min(shape), shape[1])
    assert_matches_numpy(res, W.bfloat16().float().numpy())


def test_non_finite_input_gives_a_failure_not_nan():
    W = torch.randn(10, 8)
    W[3, 2] = float("nan")
    W[0, 0] = float("inf")
    res = asvd.svd(W)
    assert not res.ok and res.method == "failed" and res.U is None and res.S is None
    assert "non-finite" in res.reason and "2" in res.reason


class LinAlgFailures:
    """Stand-in for torch.linalg.svd that raises a convergence error for the first `fail` calls."""

    def __init__(self, fail, error=torch.linalg.LinAlgError):
        self.real, self.fail, self.error, self.calls = torch.linalg.svd, fail, error, []

    def __call__(self, A, *args, **kwargs):
        self.calls.append(A)
        if len(self.calls) <= self.fail:
            raise self.error("linalg.svd: The algorithm failed to converge because the input matrix is ill-conditioned")
        return self.real(A, *args, **kwargs)


def test_convergence_failure_retries_in_float64_then_succeeds(monkeypatch):
    fake = LinAlgFailures(fail=1)
    monkeypatch.setattr(torch.linalg, "svd", fake)
    W = torch.randn(12, 9, generator=torch.Generator().manual_seed(0))
    res = asvd.svd(W)
    assert res.ok and res.method == "exact" and res.S.dtype == torch.float32
    assert [A.dtype for A in fake.calls] == [torch.float32, torch.float64]  # CPU: no gesvd step, float64 next
    assert "failed to converge" in res.notes[0]
    assert_matches_numpy(res, W.numpy())


def test_all_retries_failing_gives_a_failure_with_reason(monkeypatch):
    monkeypatch.setattr(torch.linalg, "svd", LinAlgFailures(fail=99))
    res = asvd.svd(torch.randn(6, 6))
    assert not res.ok and "float64 on CPU" in res.reason and "failed to converge" in res.reason


def test_nan_output_from_the_driver_is_retried(monkeypatch):
    real = torch.linalg.svd
    calls = []

    def nan_first(A, *args, **kwargs):
        calls.append(A)
        U, S, Vh = real(A, *args, **kwargs)
        return (U, S * float("nan"), Vh) if len(calls) == 1 else (U, S, Vh)

    monkeypatch.setattr(torch.linalg, "svd", nan_first)
    res = asvd.svd(torch.randn(7, 5))
    assert res.ok and len(calls) == 2 and torch.isfinite(res.S).all()
    assert "non-finite" in res.notes[0]


def test_device_without_svd_falls_back_to_a_cpu_copy(monkeypatch):
    """Simulates MPS: the first call (on the 'model device') raises NotImplementedError. The engine must
    retry on an explicit CPU copy, return results on the original device, and remember the device."""
    monkeypatch.setattr(asvd, "_CPU_LINALG_DEVICE_TYPES", set())
    fake = LinAlgFailures(fail=1, error=NotImplementedError)
    monkeypatch.setattr(torch.linalg, "svd", fake)
    W = torch.randn(16, 10, generator=torch.Generator().manual_seed(0))
    res = asvd.svd(W)
    assert res.ok and res.method == "exact" and res.U.device == W.device
    assert len(fake.calls) == 2 and fake.calls[1] is not fake.calls[0] and torch.equal(fake.calls[1], fake.calls[0])
    assert any("CPU copy" in note for note in res.notes)
    assert_matches_numpy(res, W.numpy())
    asvd.svd(W * 2)
    assert len(fake.calls) == 3  # the device is remembered: straight to the CPU copy, no failing first try


def test_svd_rejects_programming_errors():
    with pytest.raises(ValueError):
        asvd.svd(torch.randn(3))
    with pytest.raises(ValueError):
        asvd.svd(torch.randn(3, 3), method="eigh")




# ---------------------------------------------------------------------------------------------
# learned directions: the gap count k

GAP = asvd.SVDPolicy().svd_gap


def count(W):
    S = torch.linalg.svdvals(W.float())
    return asvd.count_learned(S, min(W.shape), GAP)


@pytest.mark.parametrize("shape", [(256, 256), (1024, 256), (256, 1024), (64, 64)])
def test_pure_noise_has_no_learned_directions_at_any_scale(shape):
    gen = torch.Generator().manual_seed(1)
    for seed in range(10):
        W = torch.randn(*shape, generator=gen) * 10 ** (seed % 5 - 2)
        learned, threshold = count(W)
        assert learned == 0 and threshold > float(torch.linalg.matrix_norm(W, ord=2))


def test_edge_scale_is_the_tracy_widom_spacing_of_a_gaussian_matrix():
    """With nothing learned, threshold = s_1 + gap * beta, beta fitted to the top values. For an n x n
    Gaussian matrix the quarter-circle law puts the j-th singular value at
    sqrt(n) (2 - (3 pi j / (4 n))^(2/3)), so beta = (3 pi / 4)^(2/3) n^(-1/6) (analytic reference)."""
    n = 256
    gen = torch.Generator().manual_seed(3)
    betas = []
    for _ in range(12):
        S = torch.linalg.svdvals(torch.randn(n, n, generator=gen, dtype=torch.float64))
        learned, threshold = asvd.count_learned(S, n, GAP)
        assert learned == 0
        betas.append((threshold - float(S[0])) / GAP)
    assert np.mean(betas) == pytest.approx((3 * math.pi / 4) ** (2 / 3) * n ** (-1 / 6), rel=0.15)


@pytest.mark.parametrize("shape", [(256, 256), (1024, 256), (256, 1024)])
def test_planted_spikes_are_counted_exactly(shape):
    """Gaussian bulk plus j planted directions 1.5x-4x the edge: k = j, the basis spans them
    (overlap with the planted subspace > 0.85), and the count is scale free."""
    n_out, n_in = shape
    for j in (1, 5, 12):
        W, U_true, _ = planted(n_out, n_in, j, seed=j)
        S = torch.linalg.svdvals(W)
        for scale in (1.0, 1e-3):
            assert asvd.count_learned(S * scale, min(shape), GAP)[0] == j
        U = torch.linalg.svd(W, full_matrices=False)[0][:, :j]
        assert float((U.T @ U_true).square().sum()) / j > 0.85  # random-matrix theory: weak spikes tilt


def test_count_of_zero_flat_low_rank_and_partial_spectra_and_the_clamp():
    assert asvd.count_learned(torch.zeros(64), 64, GAP) == (0, None)
    # an orthogonalised update (Muon's step from zero init: a flat spectrum) has nothing standing apart
    O = torch.linalg.qr(torch.randn(128, 128, generator=torch.Generator().manual_seed(2)))[0] * 0.02
    assert count(O)[0] == 0
    # an exactly rank-3 matrix: its three directions are all there is
    gen = torch.Generator().manual_seed(4)
    assert count(torch.randn(128, 3, generator=gen) @ torch.randn(3, 96, generator=gen))[0] == 3
    # a partial spectrum too short to fit the edge below any candidate cannot say
    W, _, _ = planted(128, 128, 30, seed=0)
    S = torch.linalg.svdvals(W)
    assert asvd.count_learned(S[:GAP_WINDOW], 128, GAP) == (None, None)
    # the clamp: 30 learned, at most 12 used, and the count before the clamp is kept
    res, k, learned, _ = asvd.spectrum(W, "exact", None, 128, gap=GAP, k_max=12)
    assert (k, learned) == (12, 30)


@pytest.mark.parametrize("kind", ["lowrank", "steep"])
def test_matrices_grown_from_zero_by_muon_updates_count_only_persistent_directions(kind):
    """Summed from zero out of independent Muon-style updates (no shared direction): k = 0, where the
    Marchenko-Pastur count of v2 saw up to the clamp; with 3 persistent directions at 1.5x the noise's
    largest singular value: exactly those. The issue's sizes (256^2, 100 draws) are in the slow test."""
    for draw in range(4):
        W = grown_from_zero((128, 128), 40, kind, seed=draw)
        assert count(W)[0] == 0
        W, U = plant(W, 3, 1.5, seed=draw)
        assert count(W)[0] == 3
        top = torch.linalg.svd(W, full_matrices=False)[0][:, :3]
        assert float((top.T @ U).square().sum()) / 3 > 0.85  # random-matrix theory: weak spikes tilt


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(UPDATE_KINDS))
def test_matrices_grown_from_zero_at_the_issues_sizes(kind):
    """100 independent Muon-style updates of 256 x 256 summed from zero: k = 0 in >= 99 of 100 draws;
    3 planted persistent directions at 1.5x the noise are found (exactly) in >= 95 of 100."""
    zero = found = 0
    for draw in range(100):
        W = grown_from_zero((256, 256), 100, kind, seed=draw)
        zero += count(W)[0] == 0
        found += count(plant(W, 3, 1.5, seed=draw)[0])[0] == 3
    assert zero >= 99 and found >= 95, (zero, found)


# ---------------------------------------------------------------------------------------------
# the entry test: the null law of the gradient's alignment

def pvalue(x, k, n, energies, g=None):
    """The test's p-value of an alignment p^2 = x for a gradient with these squared singular values."""
    e = torch.tensor(energies, dtype=torch.float64)
    return asvd.alignment_pvalue(math.sqrt(x), k, n, g or n, e, float(e.sum()))


@pytest.mark.parametrize("n", [256, 1280])
def test_pvalue_of_a_rank1_gradient_is_scipys_beta_tail(n):
    """Rank-1 G: p^2 is exactly Beta(k/2, (n - k)/2) under the null. At k = 1 the test's p-value is that
    tail (within the saddlepoint's accuracy); at larger k it is conservative, at most about 2x at 1e-3."""
    from scipy import stats
    for k in (1, 2, 3, 10, 25):
        for p in (0.3, 1e-2, 1e-3, 1e-4, 1e-6):
            x = stats.beta.isf(p, k / 2, (n - k) / 2)
            ratio = pvalue(x, k, n, [1.0]) / p
            assert 0.97 <= ratio <= (1.08 if k == 1 else 2.2 if p >= 1e-3 else 9.0), (k, p, ratio)
    # the famous case: k = 1, rank 1, alignment ratio 2.0 -> P = 0.157 per analysis
    assert pvalue(2 / 256, 1, 256, [1.0]) == pytest.approx(stats.beta.sf(2 / 256, 0.5, 127.5), rel=0.02)
    assert stats.beta.sf(2 / 256, 0.5, 127.5) == pytest.approx(0.157, abs=0.001)


def test_upper_tail_against_numerical_inversion_of_the_characteristic_function():
    """P(sum a_j chi^2_nu_j >= 0) against Imhof's integral (scipy.integrate.quad): mixed weights, tails
    from 0.5 down to 1e-6."""
    from scipy import integrate

    def imhof(a, nu):
        def f(u):
            theta = 0.5 * np.sum(nu * np.arctan(a * u))
            rho = np.prod((1 + a * a * u * u) ** (nu / 4))
            return np.sin(theta) / (u * rho)
        return 0.5 + integrate.quad(f, 0, np.inf, limit=500, epsabs=1e-12)[0] / np.pi

    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(40):
        m = int(rng.integers(1, 6))
        w = np.sort(rng.dirichlet(np.ones(m)))[::-1]
        k, n = int(rng.choice([1, 2, 3])), 64
        x = float(rng.uniform(k / n, w[0] / 2))
        a = np.append(w - x / k, -x / k)
        nu = np.append(np.full(m, k), k * (n - m)).astype(float)
        ref = imhof(a, nu)
        if ref < 1e-6:
            continue
        got = asvd._upper_tail(torch.tensor(a), torch.tensor(nu))
        assert got == pytest.approx(ref, rel=0.08), (a, nu)
        checked += 1
    assert checked >= 20


def haar_alignments(energies, k, n, draws, rng):
    """p^2 = sum_i w_i ||U_k^T a_i||^2 with U_k a Haar-random k-frame (G's left vectors a_i = e_i)."""
    w = np.asarray(energies, float) / np.sum(energies)
    out = np.empty(draws)
    for b in range(0, draws, 2000):
        Z = rng.standard_normal((min(2000, draws - b), n, k))
        Q = np.linalg.qr(Z)[0] if k > 1 else Z / np.linalg.norm(Z, axis=1, keepdims=True)
        out[b:b + len(Q)] = (Q[:, :len(w), :] ** 2).sum(2) @ w
    return out


def critical(alpha, k, n, energies):
    """The alignment p^2 at which the test's p-value is alpha (bisection)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if pvalue(mid, k, n, energies) > alpha else (lo, mid)
    return hi


SPECTRA = {"rank 1": [1.0], "rank 2": [0.6, 0.4], "rank 4": [0.4, 0.3, 0.2, 0.1],
           "full": list(np.linalg.svd(np.random.default_rng(9).standard_normal((128, 128)), compute_uv=False) ** 2)}


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_pvalue_is_honest_against_simulation(k, spectrum):
    """Random k-frames against a fixed gradient spectrum: alignments at or beyond the test's 1% point
    happen at most 1% of the time (within binomial noise; 10,000 frames), for low-rank and full-rank gradients."""
    n, alpha, draws = 128, 1e-2, 10_000
    x = critical(alpha, k, n, SPECTRA[spectrum])
    rate = np.mean(haar_alignments(SPECTRA[spectrum], k, n, draws, np.random.default_rng(k)) >= x)
    assert rate <= alpha + 3 * math.sqrt(alpha / draws), rate


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 2, 3, 10, 25])
@pytest.mark.parametrize("spectrum", list(SPECTRA))
def test_pvalue_is_honest_at_1e3_against_simulation(k, spectrum):
    """The same at the default svd_alpha, 1e-3, with 200,000 frames of 256 dimensions."""
    n, alpha, draws = 256, 1e-3, 200_000
    energies = SPECTRA[spectrum] if spectrum != "full" else \
        list(np.linalg.svd(np.random.default_rng(9).standard_normal((n, n)), compute_uv=False) ** 2)
    x = critical(alpha, k, n, energies)
    rate = np.mean(haar_alignments(energies, k, n, draws, np.random.default_rng(k)) >= x)
    assert rate <= alpha + 3 * math.sqrt(alpha / draws), rate


def test_gradient_energies_exact_for_low_rank_and_conservative_otherwise():
    gen = torch.Generator().manual_seed(5)
    G = torch.randn(300, 3, generator=gen) @ torch.randn(3, 200, generator=gen)
    energies, total = asvd.gradient_energies(G)
    ref = np.linalg.svd(G.double().numpy(), compute_uv=False) ** 2
    np.testing.assert_allclose(energies[:3].numpy(), ref[:3], rtol=1e-4)
    assert total == pytest.approx(ref.sum(), rel=1e-6)
    # a full-rank G: the top values are lower bounds, and the p-value from them is never below the one
    # from the whole spectrum (the rest is spread as concentrated as it can be)
    G = torch.randn(300, 200, generator=gen)
    energies, total = asvd.gradient_energies(G)
    ref = np.linalg.svd(G.double().numpy(), compute_uv=False) ** 2
    assert np.all(energies.numpy() <= ref[:len(energies)] * (1 + 1e-5))
    for k in (1, 3, 10):
        lo, hi = k / 300, 1.0  # the alignment where the whole spectrum's p-value is 1e-3
        for _ in range(60):
            mid = (lo + hi) / 2
            full = asvd.alignment_pvalue(math.sqrt(mid), k, 300, 200, torch.tensor(ref), float(ref.sum()))
            lo, hi = (mid, hi) if full > 1e-3 else (lo, mid)
        assert asvd.alignment_pvalue(math.sqrt(hi), k, 300, 200, energies, total) >= 0.999e-3
    assert asvd.alignment_pvalue(None, 3, 300, 200, energies, total) is None
    assert asvd.alignment_pvalue(0.5, 0, 300, 200, energies, total) is None


def test_gradient_metrics_of_zero_and_nonfinite_gradients_are_none_not_nan():
    U = torch.linalg.qr(torch.randn(64, 3))[0]
    for G in (torch.zeros(64, 32), torch.full((64, 32), float("nan"))):
        m = asvd.gradient_metrics(G, U)
        assert all(v is None for v in m.values()), m
    m = asvd.gradient_metrics(torch.randn(64, 32), U)
    assert 0 <= m["alignment_p"] <= 1 and m["gradient_stable_rank"] >= 1


# ---------------------------------------------------------------------------------------------
# warm SVD and its certificate

def captured(W, U_k):
    """||U_k^T W||_F^2 / sum of the true top-k S^2."""
    k = U_k.shape[1]
    true = float(torch.linalg.svdvals(W.double())[:k].square().sum())
    return float((U_k.double().T @ W.double()).square().sum()) / true


def test_warm_svd_after_drift_is_certified_and_accurate():
    n, j = 200, 12
    W, _, _ = planted(n, n, j, seed=3)
    res, k, _, _ = asvd.spectrum(W, "exact", None, n, gap=GAP, k_max=20)
    assert res.method == "exact" and k == j
    drift = torch.randn(n, n, generator=torch.Generator().manual_seed(1))
    W2 = W + 1e-2 * drift * W.norm() / drift.norm()
    warm, k2, _, _ = asvd.spectrum(W2, "warm", res.Vh[:k].T, n, gap=GAP, k_max=20)
    assert warm.method == "warm" and not warm.complete and k2 == j
    assert captured(W2, warm.U[:, :k2]) >= 0.999
    np.testing.assert_allclose(warm.S[:k2].numpy(), np.linalg.svd(W2.double().numpy(), compute_uv=False)[:k2], rtol=1e-4)
    # 'auto' is warm only above its size threshold and with a previous basis of this shape
    assert asvd.svd(W2, "auto", res.Vh[:k].T).method == "warm"
    assert asvd.svd(W2, "auto", res.Vh[:k].T, auto_exact_max_dim=200).method == "exact"
    assert asvd.svd(W2, "auto", None, auto_exact_max_dim=100).method == "exact"
    # no learned directions to start from: exact up to 512, a randomized (warm) SVD above
    assert asvd.svd(W2, "auto", res.Vh[:0].T).method == "exact"
    assert asvd.svd(W2, "auto", res.Vh[:0].T, auto_random_min_dim=150).method == "warm"
    assert "impossible" in asvd.svd(W2, "warm", torch.randn(n + 1, 3)).notes[0]


def test_clustered_top_with_a_wrong_start_falls_back_to_exact():
    """The v1 engine accepted this with captured energy 0.21-0.80: a top cluster of 40 nearly equal
    learned values, and a start basis made of the 20 directions just below it (exact singular vectors,
    so their own residual is zero). 16 random columns cannot cover the 40 missed directions; the
    probes of the deflated matrix find them and the result is rejected."""
    n = 256
    ratios = [3.0 - 0.001 * i for i in range(40)] + [2.0 - 0.01 * i for i in range(20)]
    W, _, _ = planted(n, n, 60, seed=4, ratios=ratios)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    wrong = Vh[40:60].T
    raw = asvd.svd(W, "warm", wrong)
    assert raw.method == "warm" and captured(W, raw.U[:, :40]) < 0.99  # the uncertified block is wrong
    res, k, _, _ = asvd.spectrum(W, "warm", wrong, n, gap=GAP, k_max=60)
    assert res.method == "exact" and any("rejected" in note for note in res.notes) and k == 60


def test_every_accepted_warm_result_captures_the_top_energy():
    """Many random drifts, start bases (right, partly wrong, random) and spectra: whenever the
    certificate accepts a warm result, it captures >= 0.999 of the true top-k energy."""
    accepted = 0
    for seed in range(24):
        gen = torch.Generator().manual_seed(100 + seed)
        n_out, n_in = [(160, 160), (320, 96), (96, 320)][seed % 3]
        j = 2 + seed % 9
        W, _, _ = planted(n_out, n_in, j, seed=200 + seed)
        V_true = torch.linalg.svd(W, full_matrices=False)[2][:j].T
        starts = [V_true, torch.randn(n_in, j, generator=gen), V_true[:, : j // 2]]
        for start in starts:
            drift = torch.randn(n_out, n_in, generator=gen)
            W2 = W + [1e-3, 3e-2, 0.1][seed % 3] * drift * W.norm() / drift.norm()
            res, k, _, _ = asvd.spectrum(W2, "warm", start, min(n_out, n_in), gap=GAP, k_max=20, seed=seed)
            if res.method == "warm":
                accepted += 1
                assert k == 0 or captured(W2, res.U[:, :k]) >= 0.999
    assert accepted >= 24  # the certificate is not simply rejecting everything


def test_a_warm_analysis_that_finds_nothing_learned_logs_no_spectrum_shape():
    """Its block holds lower bounds of the top singular values (nothing to converge on): s_max, the
    stable rank and the effective ranks are None rather than wrong; the exact analysis logs them."""
    W = torch.randn(300, 300, generator=torch.Generator().manual_seed(7)) / 300 ** 0.5
    policy = asvd.SVDPolicy()
    first = asvd.analyze(W, None, asvd.LayerState(), policy, 1, method="exact")
    s = np.linalg.svd(W.double().numpy(), compute_uv=False)
    assert first.metrics["k"] == 0 and first.metrics["s_max"] == pytest.approx(s[0], rel=1e-5)
    assert first.metrics["stable_rank"] == pytest.approx(np.sum(s ** 2) / s[0] ** 2, rel=1e-4)
    state = asvd.advance(asvd.LayerState(), first, W)
    warm = asvd.analyze(W, None, state, policy, 2, method="warm")
    assert warm.method == "warm" and warm.metrics["k"] == 0
    assert warm.metrics["s_max"] is None and warm.metrics["stable_rank"] is None
    assert warm.metrics["reconstruction_error"] == 1.0


# ---------------------------------------------------------------------------------------------
# protection: the projection and what it blocks

def test_projection_and_blocked_fraction_match_numpy():
    rng = np.random.default_rng(5)
    n_out, n_in, k = 30, 20, 4
    U, V = orthonormal(n_out, k, 1), orthonormal(n_in, k, 2)
    G = rng.standard_normal((n_out, n_in))
    P = (np.eye(n_out) - U @ U.T) @ G @ (np.eye(n_in) - V @ V.T)
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    np.testing.assert_allclose(asvd.project(t(G), t(U), t(V)).numpy(), P, atol=1e-5)
    assert asvd.blocked_fraction(t(G), t(U), t(V)) == pytest.approx(1 - np.sum(P ** 2) / np.sum(G ** 2), abs=1e-5)
    inside = U @ rng.standard_normal((k, n_in))
    assert asvd.blocked_fraction(t(inside), t(U), t(V)) == pytest.approx(1.0, abs=1e-5)
    assert asvd.blocked_fraction(torch.zeros(n_out, n_in), t(U), t(V)) is None
    fracs = [asvd.blocked_fraction(torch.randn(n_out, n_in), t(U), t(V)) for _ in range(300)]
    assert np.mean(fracs) == pytest.approx(asvd.blocked_fraction_baseline(k, n_out, n_in), abs=0.01)
    # k = 0: the projection is the identity, bit for bit
    G32 = t(G)
    assert torch.equal(asvd.project(G32, t(U)[:, :0], t(V)[:, :0]), G32)


# ---------------------------------------------------------------------------------------------
# layer metrics

def test_layer_metrics_are_json_ready_and_measured_against_the_previous_basis():
    n_out, n_in = 64, 48
    W, U_true, _ = planted(n_out, n_in, 4, seed=6)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    U_prev, V_prev = U[:, :4], Vh[:4].T
    G = torch.randn(n_out, n_in, generator=torch.Generator().manual_seed(0))
    m = asvd.layer_metrics(S, asvd._energy(S), 4, U, G=G, dW=None, U_prev=U_prev, V_prev=V_prev)
    json.dumps(m)
    assert m["k"] == 4 and m["k_prev"] == 4 and m["update_alignment_ratio"] is None and m["blocked_fraction"] is None
    p = float((U_prev.T @ G).norm() / G.norm())
    assert m["principal_alignment"] == pytest.approx(p, rel=1e-5)
    assert m["minor_alignment"] == pytest.approx(math.sqrt(1 - p * p), rel=1e-5)
    assert m["alignment_ratio"] == pytest.approx(p * p * n_out / 4, rel=1e-5)
    assert m["subspace_angle"] == pytest.approx(0, abs=1e-3) and m["subspace_overlap_above_chance"] == pytest.approx(1)
    assert m["reconstruction_error"] == pytest.approx(asvd.reconstruction_error(S, 4))
    m = asvd.layer_metrics(S, asvd._energy(S), 4, U, G=G, U_prev=U_prev, V_prev=V_prev, protected=True)
    assert m["blocked_fraction"] == pytest.approx(asvd.blocked_fraction(G, U_prev, V_prev))
    assert m["blocked_fraction_baseline"] == asvd.blocked_fraction_baseline(4, n_out, n_in)
    first = asvd.layer_metrics(S, asvd._energy(S), 4, U, G=G)  # no previous basis: no ratio at all
    assert first["alignment_ratio"] is None and first["k_prev"] is None and first["subspace_angle"] is None


# ---------------------------------------------------------------------------------------------
# decisions: the rule table

POLICY = asvd.SVDPolicy()
QUIET = {"k": 5, "k_prev": 5, "alignment_ratio": 1.0, "alignment_p": 0.5, "update_alignment_ratio": 1.1,
         "subspace_overlap_above_chance": 0.95}


def state(**kwargs):
    return asvd.LayerState(**{"analyses": 3, **kwargs})


def test_no_decision_without_baseline_learned_directions_or_during_warmup():
    danger = {**QUIET, "alignment_p": 1e-9}
    assert asvd.decide(danger, state(analyses=0), POLICY, 100)[:2] == (asvd.Action.KEEP, "initial_svd_baseline")
    assert asvd.decide({**danger, "k_prev": 0}, state(), POLICY, 100)[:2] == (asvd.Action.KEEP, "no_learned_directions")
    warm = asvd.SVDPolicy(svd_warmup_steps=50)
    assert asvd.decide(danger, state(), warm, 40)[:2] == (asvd.Action.KEEP, "warmup")


def test_enter_needs_a_significant_gradient_at_patience_analyses():
    danger = {**QUIET, "alignment_p": POLICY.svd_alpha}
    action, reason, streaks = asvd.decide(danger, state(), POLICY, 100)
    assert (action, streaks) == (asvd.Action.KEEP, {"gradient_clobbering_risk": 1})
    action, reason, streaks = asvd.decide(danger, state(streaks=streaks), POLICY, 120)
    assert (action, reason, streaks) == (asvd.Action.TO_LOWRANK, "gradient_clobbering_risk", {})
    # one quiet analysis in between resets the streak; just above alpha is quiet
    assert asvd.decide({**QUIET, "alignment_p": 1.01 * POLICY.svd_alpha}, state(streaks={"gradient_clobbering_risk": 1}),
                       POLICY, 120)[2] == {"gradient_clobbering_risk": 0}
    # nothing to protect now: hold
    assert asvd.decide({**danger, "k": 0}, state(streaks={"gradient_clobbering_risk": 1}), POLICY, 120)[:2] == \
        (asvd.Action.KEEP, "no_learned_directions")


def test_the_update_is_no_entry_signal():
    """v2 entered on the gradient's or the update's ratio: when W moves along the analysed gradient, the
    next analysis' update is that same gradient, so one noisy gradient counted twice. v3 reads the
    gradient only: an update as aligned as can be does not count, and no rule reads an update metric."""
    aligned_update = {**QUIET, "update_alignment_ratio": 50.0, "alignment_ratio": 50.0, "alignment_p": 0.5}
    assert asvd.decide(aligned_update, state(streaks={"gradient_clobbering_risk": 1}), POLICY, 100)[:2] == \
        (asvd.Action.KEEP, "continue_current_mode")
    assert not any("update" in metric for rule in asvd.RULES for metric, _, _ in rule.conditions)


def test_exit_reads_only_the_gradients_pvalue_in_the_band():
    low = state(mode="lowrank", streaks={"clobbering_risk_passed": 1})
    assert asvd.decide({**QUIET, "alignment_p": POLICY.svd_exit_p}, low, POLICY, 100)[:2] == \
        (asvd.Action.TO_FULL, "clobbering_risk_passed")
    # inside the band (alpha, exit_p): stays, whatever the update ratio (it is ~0 while protected)
    action, _, streaks = asvd.decide({**QUIET, "alignment_p": 0.01, "update_alignment_ratio": 0.0}, low, POLICY, 100)
    assert action == asvd.Action.KEEP and streaks == {"clobbering_risk_passed": 0}
    assert asvd.decide({**QUIET, "alignment_p": None}, low, POLICY, 100)[0] == asvd.Action.KEEP


def test_shift_policy_enters_on_a_significant_shift_and_leaves_when_it_is_gone():
    shift = asvd.SVDPolicy(svd_policy="shift")
    significant = {**QUIET, "alignment_p": 1e-6}
    # significant but at the layer's normal: no risk under shift (the adaptive policy would enter)
    assert asvd.decide({**significant, "alignment_shift": 1.0}, state(streaks={"alignment_shift_risk": 1}), shift,
                       100)[0] == asvd.Action.KEEP
    assert asvd.decide({**significant, "alignment_shift": 1.0}, state(streaks={"gradient_clobbering_risk": 1}), POLICY,
                       100)[0] == asvd.Action.TO_LOWRANK
    # shifted but not significant: no risk either (chance alignments stay what they are)
    assert asvd.decide({**QUIET, "alignment_shift": 9.0}, state(streaks={"alignment_shift_risk": 1}), shift,
                       100)[0] == asvd.Action.KEEP
    assert asvd.decide({**significant, "alignment_shift": shift.svd_shift_enter}, state(streaks={"alignment_shift_risk": 1}),
                       shift, 100)[:2] == (asvd.Action.TO_LOWRANK, "alignment_shift_risk")
    # before the layer's normal exists
    assert asvd.decide({**significant, "alignment_shift": None}, state(), shift, 100)[:2] == \
        (asvd.Action.KEEP, "building_shift_baseline")
    low = state(mode="lowrank", streaks={"alignment_shift_passed": 1})
    assert asvd.decide({**significant, "alignment_shift": shift.svd_shift_exit}, low, shift, 100)[:2] == \
        (asvd.Action.TO_FULL, "alignment_shift_passed")


def test_alignment_shift_against_the_layers_full_mode_history():
    policy = asvd.SVDPolicy(svd_shift_window=4)
    st = state(history=[1.0, 2.0, 3.0])
    metrics = {**QUIET, "alignment_ratio": 5.0}
    *_, history = asvd.judge(metrics, st, policy, 100)
    assert metrics["alignment_shift"] is None and history == [1.0, 2.0, 3.0, 5.0]  # 3 < window readings so far
    metrics = {**QUIET, "alignment_ratio": 10.0}
    *_, history = asvd.judge(metrics, asvd.LayerState(analyses=4, history=history), policy, 120)
    assert metrics["alignment_shift"] == pytest.approx(10.0 / 2.5) and history == [2.0, 3.0, 5.0, 10.0]
    # while protected the reading is logged but the normal stays the one of full-mode training
    low = asvd.LayerState(analyses=5, mode="lowrank", history=history)
    metrics = {**QUIET, "alignment_ratio": 40.0}
    *_, after = asvd.judge(metrics, low, policy, 140)
    assert metrics["alignment_shift"] == pytest.approx(40.0 / 4.0) and after == history


def test_stable_rule_is_opt_in_and_static_policy_protects_at_once_but_never_nothing():
    stable = {**QUIET, "subspace_overlap_above_chance": 0.95}
    assert asvd.decide(stable, state(streaks={"optimal_lowrank_conditions": 5}), POLICY, 100)[0] == asvd.Action.KEEP
    opt_in = asvd.SVDPolicy(svd_stable_rule=True)
    assert asvd.decide(stable, state(streaks={"optimal_lowrank_conditions": 1}), opt_in, 100)[:2] == \
        (asvd.Action.TO_LOWRANK, "optimal_lowrank_conditions")
    static = asvd.SVDPolicy(svd_policy="static")
    assert asvd.decide({"k": 3}, state(analyses=0), static, 1)[:2] == (asvd.Action.TO_LOWRANK, "static_protection")
    assert asvd.decide({"k": 0}, state(analyses=0), static, 1)[:2] == (asvd.Action.KEEP, "no_learned_directions")
    assert asvd.decide({**QUIET, "alignment_p": 0.9}, state(mode="lowrank"), static, 50)[0] == asvd.Action.KEEP


def test_decide_reads_the_rule_table(monkeypatch):
    """decide() has no thresholds of its own: changing the table changes the decision."""
    danger = {**QUIET, "alignment_p": 1e-6}
    assert asvd.decide(danger, state(streaks={"gradient_clobbering_risk": 1}), POLICY, 100)[0] == asvd.Action.TO_LOWRANK
    stricter = tuple(dataclasses.replace(r, conditions=(("alignment_p", "<=", "svd_warmup_steps"),))
                     if r.reason == "gradient_clobbering_risk" else r for r in asvd.RULES)
    monkeypatch.setattr(asvd, "RULES", stricter)  # p <= 0: never
    assert asvd.decide(danger, state(streaks={"gradient_clobbering_risk": 1}), POLICY, 100)[0] == asvd.Action.KEEP
    monkeypatch.setattr(asvd, "RULES", tuple(r for r in asvd.RULES if r.reason != "gradient_clobbering_risk"))
    assert asvd.decide(danger, state(streaks={"gradient_clobbering_risk": 1}), POLICY, 100)[0] == asvd.Action.KEEP


def test_policy_ranges_are_checked_in_one_place():
    """The policy declares its ranges and rules as plain data; nanochat.cli applies them (the maths imports no cli)."""
    from nanochat.cli import UserError, check_config

    def problem(**overrides):
        with pytest.raises(UserError) as e:
            check_config(asvd.SVDPolicy(**overrides))
        return str(e.value)

    check_config(asvd.SVDPolicy())
    assert "--svd_alpha=1.5 is out of range: use in (0, 1)" in problem(svd_alpha=1.5)
    assert "must be above --svd_alpha" in problem(svd_exit_p=1e-4)
    assert "below --svd_shift_enter" in problem(svd_shift_exit=4.0)
    assert "--svd_protect_frac=1.0 is out of range: use in [0, 1)" in problem(svd_protect_frac=1.0)
    assert "--svd_policy=sometimes is not valid: use adaptive, shift, static, observe" in problem(svd_policy="sometimes")
    assert "--svd_patience=0 is out of range: use >= 1" in problem(svd_patience=0)
    assert "--svd_gap=nan is not a finite number" in problem(svd_gap=float("nan"))
    assert asvd.k_max(256, POLICY) == 25 and asvd.k_max(5, POLICY) == 1
    assert asvd.protect_k(256, POLICY) is None and asvd.protect_k(256, asvd.SVDPolicy(svd_protect_frac=0.75)) == 192
