"""The batched analysis (nanochat/adaptive_batch.py) is the reference analysis (adaptive_svd.analyze, one
layer at a time): the same k, method, decisions and metrics over 20 consecutive analyses with switches
both ways, on d4- and d20-shaped matrices; and it waits for the device a fixed number of times per
analysis however many matrices it holds."""

import math
import warnings

import pytest
import torch

from nanochat import adaptive_svd as asvd
from nanochat.adaptive_batch import analyze_many
from nanochat.adaptive_svd import Action
from nanochat.host_sync import HostSyncs
from nanochat.synthetic import concentrated_gradient, planted, random_gradient

D4 = [(256, 256), (256, 256), (1024, 256), (256, 1024)]
D20 = [(1280, 1280), (5120, 1280), (1280, 5120)]
# gradients per analysis: a share of their energy in the planted directions (enter), none (leave), again
SCHEDULE = [0.5] * 6 + [None] * 6 + [0.5] * 8


def close(a, b, rel=1e-5):
    return (a is None and b is None) or (a is not None and b is not None and abs(a - b) <= rel * max(1.0, abs(a)))


def run_both(shapes, spikes, method="auto", analyses=20, rel=0.01, policy=None, schedule=SCHEDULE):
    """The reference and the batched analysis in lockstep on the same matrices, gradients and drift (W moves
    along the gradient, projected while the reference protects it). Returns the actions of every analysis."""
    layers = [planted(n_out, n_in, spikes, seed=i) for i, (n_out, n_in) in enumerate(shapes)]
    Ws = [W for W, _, _ in layers]
    ref_states = [asvd.LayerState() for _ in layers]
    bat_states = [asvd.LayerState() for _ in layers]
    policy = policy or asvd.SVDPolicy()
    actions = []
    for t in range(analyses):
        share = schedule[t % len(schedule)]
        Gs = [random_gradient(W.shape, None, seed=100 * t + i) if share is None else
              concentrated_gradient(U, V, W.shape, share, seed=100 * t + i) for i, (W, (_, U, V)) in enumerate(zip(Ws, layers))]
        step = 20 * (t + 1)
        ref = [asvd.analyze(W, G, s, policy, step, method=method) for W, G, s in zip(Ws, Gs, ref_states)]
        bat = analyze_many(list(zip(Ws, Gs, bat_states)), policy, step, method=method)
        for i, (r, b) in enumerate(zip(ref, bat)):
            where = f"analysis {t + 1}, layer {i} {tuple(Ws[i].shape)}"
            assert (r.method, r.action, r.reason, r.streaks) == (b.method, b.action, b.reason, b.streaks), where
            assert r.history == pytest.approx(b.history, rel=1e-5), where
            assert r.metrics.keys() == b.metrics.keys(), where
            for key, value in r.metrics.items():
                assert close(value, b.metrics[key]), (where, key, value, b.metrics[key])
            assert r.U_k.shape == b.U_k.shape and r.warm_V.shape == b.warm_V.shape, where
            # the same subspace (the sign of a singular vector is free)
            assert float((r.U_k @ r.U_k.T - b.U_k @ b.U_k.T).norm()) < 1e-4, where
        actions.append([r.action for r in ref])
        ref_states = [asvd.advance(s, a, W) for s, a, W in zip(ref_states, ref, Ws)]
        bat_states = [asvd.advance(s, a, W) for s, a, W in zip(bat_states, bat, Ws)]
        steps = [asvd.project(G, s.U_k, s.V_k) if s.mode == asvd.Mode.LOWRANK else G for G, s in zip(Gs, ref_states)]
        Ws = [W - rel * W.norm() * d / d.norm() for W, d in zip(Ws, steps)]
    return actions


def switched_both_ways(actions):
    flat = [a for row in actions for a in row]
    return Action.TO_LOWRANK in flat and Action.TO_FULL in flat


def test_batched_is_the_reference_on_d4_shapes_over_20_analyses_with_switches_both_ways(one_thread):
    actions = run_both(D4, spikes=6)
    assert switched_both_ways(actions)
    entered_again = [t for t, row in enumerate(actions) if Action.TO_LOWRANK in row]
    assert len(entered_again) >= 2  # in, out, and in again: the analyses after an exit are covered


def test_batched_is_the_reference_with_exact_svds_everywhere(one_thread):
    assert switched_both_ways(run_both(D4[:2], spikes=6, method="exact", analyses=12))


def test_batched_is_the_reference_under_the_shift_policy_and_the_protection_dial(one_thread):
    shift = asvd.SVDPolicy(svd_policy="shift", svd_shift_window=3, svd_shift_exit=2.0)
    normal_first = [None] * 4 + [0.5] * 4 + [None] * 6  # the layer's normal, then a shift, then normal again
    assert switched_both_ways(run_both(D4[:2], spikes=6, analyses=14, policy=shift, schedule=normal_first))
    dial = asvd.SVDPolicy(svd_protect_frac=0.05)  # 13 directions of 256 whatever the count: exact SVDs
    assert Action.TO_LOWRANK in [a for row in run_both(D4[:2], spikes=6, analyses=6, policy=dial) for a in row]


def test_a_zero_matrix_is_the_reference_in_the_batch(one_thread):
    policy = asvd.SVDPolicy()
    Z = torch.zeros(256, 256)
    G = random_gradient((256, 256), None, seed=0)
    ref = asvd.analyze(Z, G, asvd.LayerState(), policy, 1, method="warm")
    bat = analyze_many([(Z, G, asvd.LayerState())], policy, 1, method="warm")[0]
    assert ref.ok and bat.ok and (ref.method, ref.metrics["k"], ref.action) == (bat.method, bat.metrics["k"], bat.action)
    assert ref.metrics["k"] == 0 and ref.metrics["bulk_threshold"] is None is bat.metrics["bulk_threshold"]


@pytest.mark.slow  # d20's matrices on CPU: about a minute
def test_batched_is_the_reference_on_d20_shapes_over_20_analyses_with_switches_both_ways(one_thread):
    assert switched_both_ways(run_both(D20, spikes=8))


def test_a_rejected_or_non_finite_matrix_is_redone_alone_by_the_reference(one_thread):
    policy = asvd.SVDPolicy()
    W = planted(256, 256, 6, seed=0)[0]
    bad = W.clone()
    bad[3, 5] = math.nan
    ref = [asvd.analyze(X, None, asvd.LayerState(), policy, 1, method="auto") for X in (W, bad)]
    bat = analyze_many([(X, None, asvd.LayerState()) for X in (W, bad)], policy, 1, method="auto")
    assert ref[0].ok and bat[0].ok and bat[0].method == ref[0].method
    assert not ref[1].ok and not bat[1].ok and bat[1].failure == ref[1].failure


def analysis_syncs(n, shape=(256, 256)):
    """Host syncs of the second (warm) analysis of n same-shape matrices with the same planted directions."""
    policy = asvd.SVDPolicy()
    Ws = [planted(*shape, 6, seed=i)[0] for i in range(n)]
    Gs = [random_gradient(shape, None, seed=i) for i in range(n)]
    states = [asvd.LayerState() for _ in range(n)]
    first = analyze_many(list(zip(Ws, Gs, states)), policy, 20, method="auto")
    states = [asvd.advance(s, a, W) for s, a, W in zip(states, first, Ws)]
    Ws = [W + 1e-3 * torch.randn(W.shape, generator=torch.Generator().manual_seed(i)) for i, W in enumerate(Ws)]
    with HostSyncs() as syncs:
        out = analyze_many(list(zip(Ws, Gs, states)), policy, 40, method="auto")
    assert all(a.method == "warm" for a in out)
    return syncs


def test_host_syncs_do_not_grow_with_the_number_of_matrices(one_thread):
    few, many = analysis_syncs(2), analysis_syncs(8)
    assert few.count == many.count and few.by_kind == many.by_kind, (few.by_kind, many.by_kind)
    # and the reference waits per matrix: what the batched path removes
    W, G = planted(256, 256, 6, seed=0)[0], random_gradient((256, 256), None, seed=0)
    with HostSyncs() as one:
        asvd.analyze(W, G, asvd.LayerState(), asvd.SVDPolicy(), 20, method="auto")
    assert one.count * 8 > many.count


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: CUDA's own sync counter")
def test_cuda_synchronisations_do_not_grow_with_the_number_of_matrices():
    def cuda_syncs(n):
        policy = asvd.SVDPolicy()
        Ws = [planted(256, 256, 6, seed=i)[0].cuda() for i in range(n)]
        states = [asvd.LayerState() for _ in range(n)]
        first = analyze_many([(W, None, s) for W, s in zip(Ws, states)], policy, 20, method="auto")
        states = [asvd.advance(s, a, W) for s, a, W in zip(states, first, Ws)]
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                analyze_many([(W, None, s) for W, s in zip(Ws, states)], policy, 40, method="auto")
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in caught)

    assert cuda_syncs(2) == cuda_syncs(8)


def test_the_hooks_analysis_waits_as_often_for_one_block_as_for_four(one_thread):
    """Through the training hook (planning, console lines, records, apply): the host syncs it logs per
    analysis are the same for 4 and 16 analysed matrices of the same shapes."""
    from tests.test_adaptive_cycle import small_run

    def syncs(target_layer):
        _, model, hook, _, _ = small_run({"svd_interval": 1, "adaptive_svd_target_layer": target_layer}, depth=4)
        hook.count_syncs = hook.batched = True
        x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
        model(x, x.roll(-1, 1)).backward()
        for step in (1, 2):
            hook.after_backward(step, False)
        counts = {v for s, d in hook.logged if s == 2 for key, v in d.items() if key.endswith("/host_syncs")}
        assert len(counts) == 1  # every row of the analysis carries the analysis' count
        return counts.pop(), len(hook.layers)

    (few, n_few), (many, n_many) = syncs(0), syncs(-1)
    assert (n_few, n_many) == (4, 16) and few == many


def test_the_hook_plans_alike_batched_or_one_layer_at_a_time(one_thread, monkeypatch):
    """The training hook with the batched analysis (a GPU's) and with the reference (a CPU's): the same
    console lines, records (within 1e-5), switches both ways, bases and momentum over five analyses."""
    from tests.test_adaptive_cycle import flip_every_analysis, small_run, step

    monkeypatch.setattr(asvd, "decide", flip_every_analysis)
    runs = []
    for batched in (False, True):
        _, model, hook, muon, adamw = small_run({"svd_interval": 1, "svd_targets": "all"})
        hook.batched = batched
        for n in range(1, 6):
            step(model, muon, adamw, hook, n, n)
        runs.append((hook, muon))
    (ref, ref_muon), (bat, bat_muon) = runs
    assert ref.switches == bat.switches and ref.switches["to_full"] > 0
    for (s1, d1), (s2, d2) in zip(ref.logged, bat.logged):
        assert s1 == s2 and d1.keys() == d2.keys()
        for key, value in d1.items():
            if not key.endswith("_seconds"):
                assert close(value, d2[key]), (s1, key, value, d2[key])
    for name in ref.layers:
        a, b = ref.layers[name].module, bat.layers[name].module
        assert a.mode == b.mode and torch.allclose(a.weight, b.weight, atol=1e-6)
        if a.U_k is not None:
            assert torch.allclose(a.U_k @ a.U_k.T, b.U_k @ b.U_k.T, atol=1e-5)
    for p, q in zip(ref_muon.params(), bat_muon.params()):
        assert torch.allclose(ref_muon.state[p]["momentum_buffer"], bat_muon.state[q]["momentum_buffer"], atol=1e-6)
