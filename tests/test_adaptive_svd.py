"""Adaptive-SVD core: every metric against an independent reference (NumPy / SciPy / analytic cases),
the SVD engine's fallbacks, the rank schedule, the decision rules and the momentum transfer."""

import json
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from nanochat import adaptive_svd as asvd


@pytest.fixture(autouse=True)
def one_thread():
    """Every matrix here is tiny: one thread avoids thread hand-off stalls on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    assert asvd.choose_k(S, 0.5) == int(np.searchsorted(share, 0.5)) + 1
    # a top-k spectrum plus ||W||_F^2 gives the same answers, or None when it cannot reach the target
    total = float(np.sum(s ** 2))
    assert asvd.effective_rank(S[:20], 0.95, total) == asvd.effective_rank(S, 0.95)
    assert asvd.effective_rank(S[:3], 0.95, total) is None
    assert asvd.choose_k(S[:20], 0.5, total, g=30) == asvd.choose_k(S, 0.5)


def test_choose_k_bounds_and_zero_matrix():
    assert asvd.choose_k(torch.ones(10), 0.999) == 9  # at most g - 1: the minor part is never empty
    assert asvd.choose_k(torch.tensor([5.0, 0, 0]), 0.1) == 1
    zero = torch.zeros(5)
    assert asvd.choose_k(zero, 0.5) is None and asvd.effective_rank(zero) is None
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


def test_minor_spectrum_change_compares_bottom_values_when_r_changes():
    prev = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert asvd.minor_spectrum_change(prev, prev.clone()) == 0.0
    now = torch.tensor([2.2, 1.1])  # r shrank from 4 to 2: compare with [2, 1]
    assert asvd.minor_spectrum_change(prev, now) == pytest.approx(math.hypot(0.2, 0.1) / math.hypot(2, 1))
    assert asvd.minor_spectrum_change(torch.zeros(3), now) is None


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
    assert asvd.minor_alignment(inside, U_m) == pytest.approx(0.0, abs=1e-3)
    outside = U_m @ torch.randn(n_out - k, n_in)
    assert asvd.alignment(outside, U_k) == pytest.approx(0.0, abs=1e-3)
    assert asvd.minor_alignment(outside, U_m) == pytest.approx(1.0, abs=1e-6)
    # zero or non-finite gradient: None, never NaN
    assert asvd.alignment(torch.zeros(n_out, n_in), U_k) is None
    assert asvd.alignment(torch.full((n_out, n_in), float("nan")), U_k) is None
    assert asvd.alignment_ratio(None, k, n_out) is None


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
# trainable fraction

def numpy_trainable_fraction(G, B, A):
    P_B = B @ np.linalg.pinv(B)
    P_A = np.linalg.pinv(A) @ A
    T = P_B @ G + G @ P_A - P_B @ G @ P_A
    return np.linalg.norm(T) ** 2 / np.linalg.norm(G) ** 2


def test_trainable_fraction_analytic_and_numpy():
    rng = np.random.default_rng(0)
    n_out, n_in, r = 18, 14, 3
    B, A = rng.standard_normal((n_out, r)), rng.standard_normal((r, n_in))
    t = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    assert asvd.trainable_fraction(t(B @ rng.standard_normal((r, n_in))), t(B), t(A)) == pytest.approx(1, abs=1e-5)
    assert asvd.trainable_fraction(t(rng.standard_normal((n_out, r)) @ A), t(B), t(A)) == pytest.approx(1, abs=1e-5)
    outside = scipy.linalg.null_space(B.T) @ rng.standard_normal((n_out - r, n_in - r)) @ scipy.linalg.null_space(A).T
    assert asvd.trainable_fraction(t(outside), t(B), t(A)) == pytest.approx(0, abs=1e-5)
    for seed in range(3):
        G = np.random.default_rng(seed + 10).standard_normal((n_out, n_in))
        assert asvd.trainable_fraction(t(G), t(B), t(A)) == pytest.approx(numpy_trainable_fraction(G, B, A), abs=1e-5)
    # rank-deficient factors: a repeated column of B and a zero row of A add nothing
    B_def = np.concatenate([B, B[:, :1]], axis=1)
    A_def = np.concatenate([A, np.zeros((1, n_in))], axis=0)
    assert asvd.trainable_fraction(t(G), t(B_def), t(A_def)) == pytest.approx(numpy_trainable_fraction(G, B, A), abs=1e-5)
    assert asvd.trainable_fraction(torch.zeros(n_out, n_in), t(B), t(A)) is None


def test_trainable_fraction_baseline_matches_random_gradients():
    gen = torch.Generator().manual_seed(0)
    n_out, n_in, r = 40, 24, 6
    B, A = torch.randn(n_out, r, generator=gen), torch.randn(r, n_in, generator=gen)
    fracs = [asvd.trainable_fraction(torch.randn(n_out, n_in, generator=gen), B, A) for _ in range(200)]
    assert np.mean(fracs) == pytest.approx(asvd.trainable_fraction_baseline(r, n_out, n_in), abs=0.02)


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


def test_warm_svd_tracks_top_subspace_after_drift():
    n, k = 200, 20
    s = np.concatenate([np.geomspace(40, 4, k), np.linspace(2, 0.1, n - k)])
    W_np, W = matrix_with_spectrum(s, n, n, 0)
    prev = asvd.svd(W)
    drift = torch.randn(n, n, generator=torch.Generator().manual_seed(1))
    W2 = W + 1e-2 * drift * W.norm() / drift.norm()
    res = asvd.svd(W2, "warm", prev=prev, k=k)
    assert res.method == "warm" and not res.complete and res.residual <= 0.02
    assert res.U.shape == (n, k) and res.S.shape == (k,) and res.Vh.shape == (k, n)
    assert_matches_numpy(res, W2.double().numpy(), k)
    true_top = np.sum(np.linalg.svd(W2.double().numpy(), compute_uv=False)[:k] ** 2)
    assert float((res.U.double().T @ W2.double()).square().sum()) / true_top >= 0.99
    # chained from a warm result, and through 'auto' above its size threshold
    again = asvd.svd(W2, "auto", prev=res, k=k, auto_exact_max_dim=100)
    assert again.method == "warm"
    assert asvd.svd(W2, "auto", prev=res, k=k).method == "exact"  # 200 <= 512: small matrices go exact
    assert asvd.svd(W2, "auto", k=k, auto_exact_max_dim=100).method == "exact"  # no previous basis
    assert asvd.svd(W2, "auto", prev=res, k=60, auto_exact_max_dim=100).method == "exact"  # k > g/4: no gain


def test_warm_svd_falls_back_to_exact_on_a_bad_start():
    n, k = 120, 30
    s = np.geomspace(50, 0.5, n)
    W_np, W = matrix_with_spectrum(s, n, n, 3)
    exact = asvd.svd(W)
    # the previous "top" basis is W's bottom subspace: exact singular triples, but of the wrong ones
    bad = asvd.SVDResult(exact.U.flip(1), exact.S.flip(0), exact.Vh.flip(0), "exact", True, exact.frob_sq)
    res = asvd.svd(W, "warm", prev=bad, k=k, iters=0)
    assert res.method == "exact" and res.complete
    assert any("rejected" in note for note in res.notes)
    assert_matches_numpy(res, W_np)
    # a warm request that cannot be warm says so and is exact
    for prev, kk in ((None, k), (exact, None), (asvd.svd(torch.randn(n, n + 1)), k)):
        res = asvd.svd(W, "warm", prev=prev, k=kk)
        assert res.method == "exact" and any("impossible" in note for note in res.notes)


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
# layer metrics

def test_layer_metrics_full_and_lowrank_are_json_ready_and_consistent():
    n_out, n_in = 24, 16
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(n_out, n_in, generator=gen)
    res = asvd.svd(W)
    r = 10
    k = 16 - r
    G = torch.randn(n_out, n_in, generator=gen)
    m = asvd.layer_metrics(res, r, G=G, dW=torch.zeros_like(W), prev_U_k=res.U[:, :k], prev_minor_S=res.S[k:])
    json.dumps(m)
    assert m["k"] == k and m["update_principal_alignment"] is None and m["trainable_fraction"] is None
    assert m["alignment_ratio"] == pytest.approx(m["principal_alignment"] ** 2 * n_out / k)
    assert m["subspace_angle"] == pytest.approx(0, abs=1e-3) and m["subspace_overlap_above_chance"] == pytest.approx(1)
    assert m["minor_spectrum_change"] == 0.0
    assert m["reconstruction_error"] == pytest.approx(asvd.reconstruction_error(res.S, k))
    # low-rank split exactly as the layer does it: B = U_m sqrt(S_m), A = sqrt(S_m) V_m^T
    B = res.U[:, k:] * res.S[k:].sqrt()
    A = res.S[k:].sqrt()[:, None] * res.Vh[k:]
    m = asvd.layer_metrics(res, r, G=G, B=B, A=A)
    assert m["trainable_fraction"] == pytest.approx(
        numpy_trainable_fraction(G.double().numpy(), B.double().numpy(), A.double().numpy()), abs=1e-5)
    assert m["trainable_fraction_baseline"] == asvd.trainable_fraction_baseline(r, n_out, n_in)
    with pytest.raises(ValueError):
        asvd.layer_metrics(res, 16, G=G)  # k = 0


# ---------------------------------------------------------------------------------------------
# rank schedule

def test_rank_schedule_shrinks_grows_and_clamps():
    g, k_min = 256, 10
    r = asvd.initial_rank(g, k_min)
    assert r == 246
    bounds = dict(r_min=8, r_max=g - k_min)
    assert asvd.next_rank(r, 0.05, **bounds) == math.floor(246 * 0.8) == 196
    assert asvd.next_rank(100, 0.5, **bounds) == 125
    assert asvd.next_rank(r, 0.5, **bounds) == 246  # grow clamped at g - k_min
    assert asvd.next_rank(9, 0.0, **bounds) == 8  # shrink clamped at r_min
    assert asvd.next_rank(100, None, **bounds) == 100  # no previous spectrum: keep
    assert asvd.next_rank(100, 0.1, **bounds) == 100  # exactly at tol: keep
    assert asvd.next_rank(100, 0.05, r_min=8, r_max=246, decay=0.5) == 50
    assert asvd.next_rank(5, 0.5, r_min=8, r_max=6) == 6  # r_max wins over r_min on tiny matrices


# ---------------------------------------------------------------------------------------------
# decisions

POLICY = asvd.SVDPolicy()
QUIET = {"alignment_ratio": 1.0, "update_alignment_ratio": 1.1, "subspace_overlap_above_chance": 0.5,
         "reconstruction_error": 0.9, "trainable_fraction": 0.9, "subspace_angle": 0.1}


def state(**kwargs):
    return asvd.LayerSVDState(**{"analyses": 3, **kwargs})


def test_no_decision_without_baseline_or_during_warmup():
    danger = {**QUIET, "alignment_ratio": 5.0}
    assert asvd.decide(danger, asvd.LayerSVDState(), POLICY, step=100) == ("keep", "initial_svd_baseline")
    warm = asvd.SVDPolicy(svd_warmup_steps=50)
    assert asvd.decide(danger, state(), warm, step=40) == ("keep", "warmup")
    assert asvd.decide(danger, state(), warm, step=50) == ("to_lowrank", "gradient_clobbering_risk")


def test_full_to_lowrank_on_gradient_or_update_alignment():
    assert asvd.decide({**QUIET, "alignment_ratio": 2.0}, state(), POLICY, 40) == ("to_lowrank", "gradient_clobbering_risk")
    assert asvd.decide({**QUIET, "update_alignment_ratio": 3.0}, state(), POLICY, 40) == ("to_lowrank", "gradient_clobbering_risk")
    assert asvd.decide({**QUIET, "alignment_ratio": 1.9}, state(), POLICY, 40) == ("keep", "continue_current_mode")
    assert asvd.decide({**QUIET, "alignment_ratio": None}, state(), POLICY, 40) == ("keep", "continue_current_mode")


def test_full_to_lowrank_on_stable_subspace_and_safe_reconstruction():
    stable = {**QUIET, "subspace_overlap_above_chance": 0.95, "reconstruction_error": 0.9}
    assert asvd.decide(stable, state(), POLICY, 40) == ("to_lowrank", "optimal_lowrank_conditions")
    assert asvd.decide({**stable, "reconstruction_error": 0.97}, state(), POLICY, 40)[0] == "keep"
    assert asvd.decide({**stable, "subspace_overlap_above_chance": 0.85}, state(), POLICY, 40)[0] == "keep"


def run_lowrank(metrics, n, policy=POLICY):
    """Feed the same metrics to a layer that entered low-rank mode long ago, n analyses in a row."""
    st, actions = state(mode="lowrank", last_switch=0, analyses=10), []
    for _ in range(n):
        action, reason = asvd.decide(metrics, st, policy, 1000)
        actions.append((action, reason))
        st = asvd.advance_state(st, action, metrics, policy)
    return actions, st


@pytest.mark.parametrize("bad, reason", [({"trainable_fraction": 0.3}, "lowrank_cannot_follow_gradient"),
                                         ({"subspace_angle": 0.8}, "principal_subspace_rotated")])
def test_lowrank_to_full_needs_patience(bad, reason):
    actions, st = run_lowrank({**QUIET, **bad}, 2)
    assert actions == [("keep", "continue_current_mode"), ("to_full", reason)]
    assert st.mode == "full" and st.bad_count == 0 and st.last_switch == 11
    actions, _ = run_lowrank({**QUIET, **bad}, 3, asvd.SVDPolicy(svd_patience=3))
    assert [a for a, _ in actions] == ["keep", "keep", "to_full"]


def test_lowrank_bad_streak_resets_on_a_good_analysis():
    st = state(mode="lowrank", last_switch=0, analyses=10)
    for metrics in ({**QUIET, "subspace_angle": 0.8}, QUIET, {**QUIET, "subspace_angle": 0.8}):
        action, _ = asvd.decide(metrics, st, POLICY, 1000)
        assert action == "keep"
        st = asvd.advance_state(st, action, metrics, POLICY)
    assert st.bad_count == 1 and st.mode == "lowrank"


def test_hysteresis_holds_a_switch_back():
    st = asvd.advance_state(state(), "to_lowrank", QUIET, POLICY)  # switched at analysis 3
    assert st.mode == "lowrank" and st.last_switch == 3 and st.analyses == 4
    bad = {**QUIET, "trainable_fraction": 0.1}
    history = []
    for _ in range(4):
        action, reason = asvd.decide(bad, st, POLICY, 1000)
        history.append((action, reason))
        st = asvd.advance_state(st, action, bad, POLICY)
    assert history == [("keep", "continue_current_mode"),
                       ("keep", "hysteresis_hold:lowrank_cannot_follow_gradient"),
                       ("to_full", "lowrank_cannot_follow_gradient"),
                       ("keep", "continue_current_mode")]
    # and right after switching back to full, a clobbering signal is held too
    assert asvd.decide({**QUIET, "alignment_ratio": 9.0}, st, POLICY, 1000) == (
        "keep", "hysteresis_hold:gradient_clobbering_risk")


def test_quiet_layers_continue_in_their_mode():
    assert asvd.decide(QUIET, state(), POLICY, 40) == ("keep", "continue_current_mode")
    assert asvd.decide(QUIET, state(mode="lowrank"), POLICY, 40) == ("keep", "continue_current_mode")
    assert asvd.decide({}, state(mode="lowrank"), POLICY, 40) == ("keep", "continue_current_mode")


# ---------------------------------------------------------------------------------------------
# momentum transfer

def tangent_projection(X, B, A):
    P_B, P_A = B @ np.linalg.pinv(B), np.linalg.pinv(A) @ A
    return P_B @ X + X @ P_A - P_B @ X @ P_A


def test_momentum_to_lowrank_is_the_chain_rule():
    gen = torch.Generator().manual_seed(0)
    W_p, B, A = torch.randn(9, 7, generator=gen), torch.randn(9, 3, generator=gen), torch.randn(3, 7, generator=gen)
    target = torch.randn(9, 7, generator=gen)
    B_, A_ = B.clone().requires_grad_(), A.clone().requires_grad_()
    W = W_p + B_ @ A_
    ((W - target) ** 2).sum().backward()
    G = 2 * (W_p + B @ A - target)
    M_B, M_A = asvd.momentum_to_lowrank(G, B, A)
    torch.testing.assert_close(M_B, B_.grad)
    torch.testing.assert_close(M_A, A_.grad)


def test_momentum_round_trip_lies_in_the_tangent_space():
    rng = np.random.default_rng(0)
    B, A, M = rng.standard_normal((10, 3)), rng.standard_normal((3, 8)), rng.standard_normal((10, 8))
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    M_W = asvd.momentum_to_full(*asvd.momentum_to_lowrank(t(M), t(B), t(A)), t(B), t(A)).numpy()
    np.testing.assert_allclose(M_W, M @ A.T @ A + B @ B.T @ M, atol=1e-10)
    np.testing.assert_allclose(tangent_projection(M_W, B, A), M_W, atol=1e-10)
    # with orthonormal factors and no component in span(B) x rowspan(A) it is exactly the projection
    Q_B, Q_A = np.linalg.qr(B)[0], np.linalg.qr(A.T)[0].T
    M_0 = M - Q_B @ Q_B.T @ M @ Q_A.T @ Q_A
    M_W = asvd.momentum_to_full(*asvd.momentum_to_lowrank(t(M_0), t(Q_B), t(Q_A)), t(Q_B), t(Q_A)).numpy()
    np.testing.assert_allclose(M_W, tangent_projection(M_0, Q_B, Q_A), atol=1e-10)
