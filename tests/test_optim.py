"""Muon (Newton-Schulz orthogonalisation, momentum, name-keyed state) and AdamW setup. Muon's projection for
protected layers is tested with the layer, in tests/test_adaptive_cycle.py."""

import torch

from nanochat.optim import Muon, build_optimizers, muon_momentum, zeropower_via_newtonschulz5
from tests.conftest import tiny_model


def test_newton_schulz_approximately_orthogonalises():
    torch.manual_seed(0)
    for shape in [(64, 64), (32, 128), (128, 32)]:
        G = torch.randn(*shape)
        X = zeropower_via_newtonschulz5(G, steps=5)
        s, s_g = torch.linalg.svdvals(X), torch.linalg.svdvals(G)
        # quintic NS drives singular values that are not tiny into roughly [0.7, 1.2], not exactly 1
        # (by design in Muon); near-zero ones (square Gaussian matrices have one) grow but stay below
        big = s_g > 0.05 * s_g.max()
        assert s[big].min() > 0.5 and s.max() < 1.3
        # same singular vectors as G: X is close to U V^T
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        cos = torch.sum(X * (U @ Vh)) / (X.norm() * (U @ Vh).norm())
        assert cos > 0.95


def test_batched_newton_schulz_matches_single():
    G = torch.randn(3, 16, 48)
    Xb = zeropower_via_newtonschulz5(G)
    for i in range(3):
        assert torch.allclose(Xb[i], zeropower_via_newtonschulz5(G[i]), atol=1e-5)


def reference_muon_update(p, buf, grad, lr, momentum):
    buf = buf.lerp(grad, 1 - momentum)
    g = grad.lerp(buf, momentum)
    u = zeropower_via_newtonschulz5(g)
    return p - lr * max(1, p.shape[0] / p.shape[1]) ** 0.5 * u, buf


def test_muon_step_matches_reference():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(32, 16))
    b = torch.nn.Parameter(torch.randn(16, 32))
    opt = Muon([("a", a), ("b", b)], lr=0.05, momentum=0.9)
    refs = {"a": (a.detach().clone(), torch.zeros(32, 16)), "b": (b.detach().clone(), torch.zeros(16, 32))}
    for _ in range(3):
        ga, gb = torch.randn(32, 16), torch.randn(16, 32)
        a.grad, b.grad = ga.clone(), gb.clone()
        opt.step()
        refs["a"] = reference_muon_update(*refs["a"], ga, 0.05, 0.9)
        refs["b"] = reference_muon_update(*refs["b"], gb, 0.05, 0.9)
        assert torch.allclose(a, refs["a"][0], atol=1e-5) and torch.allclose(b, refs["b"][0], atol=1e-5)


def test_state_dict_round_trip_is_order_independent():
    ps = [(f"p{i}", torch.nn.Parameter(torch.randn(4, 4))) for i in range(3)]
    opt = Muon(ps)
    for _, p in ps:
        p.grad = torch.randn(4, 4)
    opt.step()
    sd = opt.state_dict()
    opt2 = Muon(list(reversed(ps)))
    opt2.load_state_dict(sd)
    for _, p in ps:
        assert torch.equal(opt2.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])


def test_momentum_ramp():
    assert muon_momentum(0) == 0.85
    assert abs(muon_momentum(150) - 0.90) < 1e-12
    assert muon_momentum(300) == 0.95 and muon_momentum(10_000) == 0.95


def test_build_optimizers_groups_and_scaled_lrs():
    model = tiny_model(depth=2, vocab=256, seq=32)
    muon, adamw = build_optimizers(model, 0.02, 0.2, 0.004)
    scale = (128 / 768) ** -0.5
    assert abs(adamw.param_groups[0]["lr"] - 0.004 * scale) < 1e-12
    assert abs(adamw.param_groups[1]["lr"] - 0.2 * scale) < 1e-12
    assert adamw.param_groups[0]["betas"] == (0.8, 0.95) and adamw.param_groups[0]["eps"] == 1e-10
    assert adamw.param_groups[0]["weight_decay"] == 0.0
    assert len(muon.params()) == 2 * 6 and all(p.dim() == 2 for p in muon.params())
