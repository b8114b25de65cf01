"""The policy over many analyses, on simulated layers: random gradients never switch a layer, a
gradient concentrated on the learned directions switches it within svd_patience analyses (also late
in a run), the layer leaves once the pressure is gone, and no deterministic cycle appears. Also the
update metric's bias: an update independent of W scores 1 on average.

The simulation (nanochat/synthetic.py; scripts/method_checks.py prints the same scenarios as numbers)
runs the real per-layer analysis (`adaptive_svd.analyze` / `advance`) on a W with planted learned
directions, applying after each analysis an update of 1% of ||W|| along the (projected, while
protected) gradient.
"""

import numpy as np
import pytest
import torch

from nanochat import adaptive_svd as asvd
from nanochat.synthetic import (concentrated_gradient, planted, random_gradient, simulate,
                                update_ratio_of_random_updates)

# the square shape runs by default, the tall and wide ones with the slow tests (CI runs both)
SHAPES = [(256, 256), pytest.param((1024, 256), marks=pytest.mark.slow), pytest.param((256, 1024), marks=pytest.mark.slow)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rank", [None, 4])
def test_random_gradients_never_switch_a_layer(shape, rank):
    """Gaussian (rank None) and random rank-4 gradients, 200 analyses, a layer with 10 learned directions."""
    W, _, _ = planted(*shape, j=10, seed=1)
    modes, records = simulate(W, lambda t, W, U, V: random_gradient(W.shape, rank, seed=t), analyses=200)
    assert set(modes) == {"full"}, "".join(m[0].upper() for m in modes)
    ratios = [r["alignment_ratio"] for r in records if r["alignment_ratio"] is not None]
    assert len(ratios) == 199 and np.mean(ratios) == pytest.approx(1.0, abs=0.1) and max(ratios) < 2.0


@pytest.mark.parametrize("shape", SHAPES)
def test_concentrated_gradient_switches_within_patience_also_late_and_leaves_when_it_passes(shape):
    W, U_true, V_true = planted(*shape, j=10, seed=2)
    policy = asvd.SVDPolicy()

    def gradient(t, W, U, V):
        if 20 <= t < 60:  # pressure on the learned directions from analysis 20 to 59
            return concentrated_gradient(U_true, V_true, W.shape, share=0.8, seed=t)
        return random_gradient(W.shape, None, seed=t)

    modes, records = simulate(W, gradient, analyses=100, policy=policy)
    seq = "".join(m[0].upper() for m in modes)
    first_low = seq.index("L")
    assert 20 <= first_low <= 20 + policy.svd_patience - 1, seq  # within patience of the pressure starting
    assert set(seq[first_low:60]) == {"L"}, seq  # protected while the pressure lasts
    assert "L" not in seq[60 + policy.svd_patience:], seq  # and back to full once it has passed
    assert seq.count("FL") == 1 and seq.count("LF") == 1, seq  # one entry, one exit: no cycle
    entered = records[first_low]
    assert entered["reason"] == "gradient_clobbering_risk" and entered["k"] >= 10


def test_constant_pressure_gives_one_switch_and_no_cycle():
    W, U_true, V_true = planted(256, 256, j=10, seed=3)
    modes, _ = simulate(W, lambda t, W, U, V: concentrated_gradient(U_true, V_true, W.shape, share=0.8, seed=t),
                        analyses=200)
    seq = "".join(m[0].upper() for m in modes)
    assert seq.count("FL") == 1 and "LF" not in seq, seq


def test_while_protected_the_learned_directions_do_not_move():
    W, U_true, V_true = planted(256, 256, j=10, seed=4)
    modes, records = simulate(W, lambda t, W, U, V: concentrated_gradient(U_true, V_true, W.shape, share=0.8, seed=t),
                              analyses=40, keep_states=True)
    first = modes.index("lowrank")
    st = records[first]["state"]
    W_now = records[-1]["W"]
    S = (st.U_k.T @ W_now @ st.V_k).diagonal()
    assert torch.allclose(S, st.S_k, rtol=1e-4)
    assert float((W_now @ st.V_k - st.U_k * st.S_k).norm() / st.S_k.norm()) < 1e-5


@pytest.mark.parametrize("shape", SHAPES)
def test_update_ratio_of_an_update_independent_of_W_is_one(shape):
    """The v1 metric measured dW against the U_k of the new W, which dW itself had shaped (mean 4.1 for
    a random rank-4 update at |dW|/|W| = 0.1). Against the previous analysis' basis it is unbiased."""
    for rel in (0.1, 0.3):
        ratios = update_ratio_of_random_updates(shape, rank=4, rel=rel, draws=100, seed=5)
        assert np.mean(ratios) == pytest.approx(1.0, abs=0.1), (shape, rel)
