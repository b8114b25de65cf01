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


def test_confined_adamw_keeps_the_top_triples_exact_and_unconfined_is_torchs_adamw():
    """A confined matrix: over 60 steps of random gradients (weight decay on), its top-k singular triples at the
    moment of confining stay exact to fp32 rounding and every change lies in the minor subspace, while the rest of
    the matrix moves; an unconfined parameter, and a run with nothing confined, step exactly as torch's AdamW."""
    from nanochat.optim import AdamW
    g = torch.Generator().manual_seed(0)
    W = torch.nn.Parameter(torch.randn(96, 40, generator=g))
    free = torch.nn.Parameter(torch.randn(96, 40, generator=g))
    twin_W, twin_free = (torch.nn.Parameter(p.detach().clone()) for p in (W, free))
    opt = AdamW([W, free], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    ref = torch.optim.AdamW([twin_W, twin_free], lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    U, S, Vh = torch.linalg.svd(W.detach().double(), full_matrices=False)
    k = 6
    U_k, S_k, V_k = U[:, :k], S[:k], Vh[:k].T
    opt.confine(W, U_k, V_k)
    start = W.detach().clone()
    for _ in range(60):
        grads = [torch.randn(96, 40, generator=g) for _ in range(2)]
        W.grad, free.grad = (x.clone() for x in grads)
        twin_W.grad, twin_free.grad = (x.clone() for x in grads)
        opt.step()
        ref.step()
    Wd = W.detach().double()
    scale = float(S_k[0])
    assert float((Wd @ V_k - U_k * S_k).norm()) / scale < 1e-5
    assert float((U_k.T @ Wd - S_k[:, None] * V_k.T).norm()) / scale < 1e-5
    change = Wd - start.double()
    assert float(change.norm()) > 0.5  # the minor subspace trained
    assert float((U_k.T @ change).norm()) < 1e-5 * float(change.norm()) and float((change @ V_k).norm()) < 1e-5 * float(change.norm())
    assert torch.equal(free, twin_free)  # moments and update of an unconfined parameter untouched
    assert torch.equal(opt.state[W]["exp_avg"], ref.state[twin_W]["exp_avg"])  # the moments see the whole gradient
    assert not torch.equal(W, twin_W)
    plain, torch_plain = (torch.nn.Parameter(start.clone()) for _ in range(2))
    a = AdamW([plain], lr=0.01, weight_decay=0.1)
    b = torch.optim.AdamW([torch_plain], lr=0.01, weight_decay=0.1)
    for _ in range(5):
        plain.grad = torch_plain.grad = torch.randn(96, 40, generator=g)
        a.step()
        b.step()
    assert torch.equal(plain, torch_plain)
