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
from nanochat.synthetic import planted


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
# learned directions: the bulk threshold and the count k

@pytest.mark.parametrize("shape", [(256, 256), (1024, 256), (256, 1024), (64, 64)])
def test_gaussian_largest_singular_value_sits_at_the_bulk_threshold(shape):
    """Marchenko-Pastur edge plus Tracy-Widom scale, against NumPy's largest singular value of
    Gaussian matrices: the mean sits just below the edge, and tw = 3.3 is above every draw."""
    n_out, n_in = shape
    rng = np.random.default_rng(0)
    def top(X):  # largest singular value from the small Gram matrix's largest eigenvalue
        return math.sqrt(np.linalg.eigvalsh(X.T @ X if X.shape[0] >= X.shape[1] else X @ X.T)[-1])
    tops = [top(rng.standard_normal(shape)) for _ in range(12)]
    edge = asvd.bulk_threshold(1.0, n_out, n_in, 0.0)
    assert edge == pytest.approx(math.sqrt(n_out) + math.sqrt(n_in))
    assert np.mean(tops) == pytest.approx(edge, rel=0.03) and np.mean(tops) < edge
    assert max(tops) < asvd.bulk_threshold(1.0, n_out, n_in, 3.3)


@pytest.mark.parametrize("shape", [(256, 256), (1024, 256), (256, 1024)])
def test_pure_noise_has_no_learned_directions_at_any_scale(shape):
    gen = torch.Generator().manual_seed(1)
    for seed in range(10):
        W = torch.randn(*shape, generator=gen) * 10 ** (seed % 5 - 2)
        S = torch.linalg.svdvals(W)
        k, sigma, _ = asvd.count_learned(S, asvd._energy(S), *shape, tw=3.3, k_max=25)
        assert k == 0
        assert sigma == pytest.approx(float(W.std()), rel=0.01)


@pytest.mark.parametrize("shape", [(256, 256), (1024, 256), (256, 1024)])
def test_planted_spikes_are_counted_exactly(shape):
    """Gaussian bulk plus j planted directions 1.5x-4x the edge: k = j, the basis spans them
    (overlap with the planted subspace > 0.99), and the count is scale free."""
    n_out, n_in = shape
    for j in (1, 5, 12):
        W, U_true, _ = planted(n_out, n_in, j, seed=j)
        S = torch.linalg.svdvals(W)
        for scale in (1.0, 1e-3):
            k, _, _ = asvd.count_learned(S * scale, asvd._energy(S * scale), n_out, n_in, tw=3.3, k_max=25)
            assert k == j
        U = torch.linalg.svd(W, full_matrices=False)[0][:, :j]
        assert float((U.T @ U_true).square().sum()) / j > 0.85  # random-matrix theory: weak spikes tilt


def test_count_clamp_zero_matrix_and_no_bulk():
    W, _, _ = planted(128, 128, 30, seed=0)
    S = torch.linalg.svdvals(W)
    assert asvd.count_learned(S, asvd._energy(S), 128, 128, tw=3.3, k_max=12)[0] == 12
    zero = torch.zeros(64)
    assert asvd.count_learned(zero, 0.0, 64, 64, tw=3.3, k_max=6)[0] == 0
    # an orthogonalised update (Muon's step from zero init: a flat spectrum) has no outlier
    O = torch.linalg.qr(torch.randn(128, 128, generator=torch.Generator().manual_seed(2)))[0] * 0.02
    S = torch.linalg.svdvals(O)
    assert asvd.count_learned(S, asvd._energy(S), 128, 128, tw=3.3, k_max=12)[0] == 0
    # a partial spectrum whose values all stand out cannot say where the bulk starts
    S = torch.linalg.svdvals(W)
    assert asvd.count_learned(S[:8], asvd._energy(S), 128, 128, tw=3.3, k_max=40)[0] is None


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
    res, k, _, _ = asvd.spectrum(W, "exact", None, n, n, tw=3.3, k_max=20)
    assert res.method == "exact" and k == j
    drift = torch.randn(n, n, generator=torch.Generator().manual_seed(1))
    W2 = W + 1e-2 * drift * W.norm() / drift.norm()
    warm, k2, _, _ = asvd.spectrum(W2, "warm", res.Vh[:k].T, n, n, tw=3.3, k_max=20)
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
    assert raw.method == "warm"
    k_raw = asvd.count_learned(raw.S, raw.frob_sq, n, n, tw=3.3, k_max=60)[0]
    assert k_raw is not None and captured(W, raw.U[:, :min(k_raw, 40)]) < 0.99  # the uncertified block is wrong
    res, k, _, _ = asvd.spectrum(W, "warm", wrong, n, n, tw=3.3, k_max=60)
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
            res, k, _, _ = asvd.spectrum(W2, "warm", start, n_out, n_in, tw=3.3, k_max=20, seed=seed)
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
QUIET = {"k": 5, "k_prev": 5, "alignment_ratio": 1.0, "update_alignment_ratio": 1.1, "subspace_overlap_above_chance": 0.95}


def state(**kwargs):
    return asvd.LayerState(**{"analyses": 3, **kwargs})


def test_no_decision_without_baseline_learned_directions_or_during_warmup():
    danger = {**QUIET, "alignment_ratio": 5.0}
    assert asvd.decide(danger, state(analyses=0), POLICY, 100)[:2] == (asvd.Action.KEEP, "initial_svd_baseline")
    assert asvd.decide({**danger, "k_prev": 0}, state(), POLICY, 100)[:2] == (asvd.Action.KEEP, "no_learned_directions")
    warm = asvd.SVDPolicy(svd_warmup_steps=50)
    assert asvd.decide(danger, state(), warm, 40)[:2] == (asvd.Action.KEEP, "warmup")


@pytest.mark.parametrize("key", ["alignment_ratio", "update_alignment_ratio"])
def test_enter_needs_patience_on_gradient_or_update_ratio(key):
    danger = {**QUIET, key: 2.0}
    action, reason, streaks = asvd.decide(danger, state(), POLICY, 100)
    assert (action, streaks) == (asvd.Action.KEEP, {"gradient_clobbering_risk": 1})
    action, reason, streaks = asvd.decide(danger, state(streaks=streaks), POLICY, 120)
    assert (action, reason, streaks) == (asvd.Action.TO_LOWRANK, "gradient_clobbering_risk", {})
    # one quiet analysis in between resets the streak
    assert asvd.decide(QUIET, state(streaks={"gradient_clobbering_risk": 1}), POLICY, 120)[2] == {"gradient_clobbering_risk": 0}
    # nothing to protect now: hold
    assert asvd.decide({**danger, "k": 0}, state(streaks={"gradient_clobbering_risk": 1}), POLICY, 120)[:2] == \
        (asvd.Action.KEEP, "no_learned_directions")


def test_exit_reads_only_the_gradient_ratio_in_the_band():
    low = state(mode="lowrank", streaks={"clobbering_risk_passed": 1})
    assert asvd.decide({**QUIET, "alignment_ratio": 1.25}, low, POLICY, 100)[:2] == (asvd.Action.TO_FULL, "clobbering_risk_passed")
    # inside the band (1.25, 2.0): stays, whatever the update ratio (it is ~0 while protected)
    action, _, streaks = asvd.decide({**QUIET, "alignment_ratio": 1.6, "update_alignment_ratio": 0.0}, low, POLICY, 100)
    assert action == asvd.Action.KEEP and streaks == {"clobbering_risk_passed": 0}
    assert asvd.decide({**QUIET, "alignment_ratio": None}, low, POLICY, 100)[0] == asvd.Action.KEEP


def test_stable_rule_is_opt_in_and_static_policy_protects_at_once():
    stable = {**QUIET, "subspace_overlap_above_chance": 0.95}
    assert asvd.decide(stable, state(streaks={"optimal_lowrank_conditions": 5}), POLICY, 100)[0] == asvd.Action.KEEP
    opt_in = asvd.SVDPolicy(svd_stable_rule=True)
    assert asvd.decide(stable, state(streaks={"optimal_lowrank_conditions": 1}), opt_in, 100)[:2] == \
        (asvd.Action.TO_LOWRANK, "optimal_lowrank_conditions")
    static = asvd.SVDPolicy(svd_policy="static")
    assert asvd.decide({}, state(analyses=0), static, 1)[:2] == (asvd.Action.TO_LOWRANK, "static_protection")
    assert asvd.decide({**QUIET, "alignment_ratio": 0.1}, state(mode="lowrank"), static, 50)[0] == asvd.Action.KEEP


def test_decide_reads_the_rule_table(monkeypatch):
    """decide() has no thresholds of its own: changing the table changes the decision."""
    danger = {**QUIET, "alignment_ratio": 3.0}
    assert asvd.decide(danger, state(streaks={"gradient_clobbering_risk": 1}), POLICY, 100)[0] == asvd.Action.TO_LOWRANK
    stricter = tuple(dataclasses.replace(r, threshold="svd_overlap_stable") if r.reason == "gradient_clobbering_risk" else r
                     for r in asvd.RULES)
    monkeypatch.setattr(asvd, "RULES", stricter)
    # now the rule compares 3.0 with svd_overlap_stable = 0.9 ... and the update ratio 1.1 too: still fires
    assert asvd.decide(danger, state(streaks={"gradient_clobbering_risk": 1}), POLICY, 100)[0] == asvd.Action.TO_LOWRANK
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
    assert "--svd_ratio_enter=0.5 is out of range: use > 1" in problem(svd_ratio_enter=0.5)
    assert "below --svd_ratio_enter" in problem(svd_ratio_exit=2.5)
    assert "could never fire" in problem(svd_k_max_frac=0.5)
    assert "--svd_policy=sometimes is not valid: use adaptive, static or observe" in problem(svd_policy="sometimes")
    assert "--svd_patience=0 is out of range: use >= 1" in problem(svd_patience=0)
    assert "--svd_edge_tw=nan is not a finite number" in problem(svd_edge_tw=float("nan"))
    assert asvd.k_max(256, POLICY) == 25 and asvd.k_max(5, POLICY) == 1
