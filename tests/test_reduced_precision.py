"""Protected mode stays exact under reduced-precision matmuls (CUDA's TF32, bf16 autocast), simulated on
CPU with the test double in tests/reduced_precision.py: the protection's products run at full fp32
precision (adaptive_svd.full_precision) while the process keeps TF32 on for everything else."""

import contextlib

import pytest
import torch

from nanochat import adaptive_svd as asvd
from nanochat.gpt import AdaptiveSVDLinear
from nanochat.optim import Muon
from nanochat.synthetic import planted
from tests.reduced_precision import CudaMatmuls, round_mantissa

LIMIT = 1e-5  # the gpu_check's bound on the principal share of an update and on the triples' drift


@pytest.fixture
def tf32_on():
    """The process as compute_init leaves it on CUDA: fp32 matmuls may run as TF32."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = before


def test_the_double_rounds_like_tf32_and_bf16_and_leaves_ieee_alone(tf32_on):
    x = torch.randn(10_000)
    assert torch.equal(round_mantissa(x, 7), x.to(torch.bfloat16).float())
    assert float(((round_mantissa(x, 10) - x).abs() / x.abs()).max()) <= 2.0 ** -11
    a, b = torch.randn(128, 128, dtype=torch.float64), torch.randn(128, 128, dtype=torch.float64)
    ref = a @ b
    err = lambda c: float((c.double() - ref).norm() / ref.norm())
    with CudaMatmuls() as double:
        tf32 = err(a.float() @ b.float())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = err(torch.mm(a.float(), b.float()))
        with asvd.full_precision("cpu"):
            ieee = err(torch.addmm(torch.zeros(128, 128), a.float(), b.float()))
    assert 3e-5 < tf32 < 1e-3 and 3e-4 < bf16 < 1e-2 and ieee < 1e-6
    assert (double.rounded, double.exact) == (2, 1)
    assert torch.backends.cuda.matmul.allow_tf32  # the scope restored the process setting


def protected_muon_run(steps=50, autocast=False, n=128, k=16, seed=0):
    """A protected n x n layer under Muon (bf16 Newton-Schulz, as on CUDA): one full-mode step builds
    momentum along the principal directions, then protection starts (momentum projected once, as on
    entry), then `steps` steps on gradients with a third of their energy in the principal block.
    Returns (largest principal share of an update, the triples' drift), both relative."""
    W, _, _ = planted(n, n, k, seed=seed)
    U, S, Vh = torch.linalg.svd(W.double(), full_matrices=False)
    U, S, V = U[:, :k].float(), S[:k].float(), Vh[:k].T.float()
    U64, V64 = U.double(), V.double()
    layer = AdaptiveSVDLinear(n, n)
    with torch.no_grad():
        layer.weight.copy_(W)
    muon = Muon([("w", layer.weight)], lr=0.02, layers={layer.weight: layer}, ns_dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(seed)

    def gradient():
        inside = U @ torch.randn(k, k, generator=gen) @ V.T
        noise = torch.randn(n, n, generator=gen)
        return inside / inside.norm() * 0.6 + noise / noise.norm() * 0.8

    step_scope = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    layer.weight.grad = gradient()
    muon.step()
    with torch.no_grad():
        layer.weight.copy_(W)  # the triples hold exactly from here on
    layer.protect(U, V)
    with step_scope:
        muon.project_momentum(layer.weight)
    worst = 0.0
    for _ in range(steps):
        layer.weight.grad = gradient()
        before = layer.weight.detach().clone()
        with step_scope:
            muon.step()
        dW = (layer.weight.detach() - before).double()  # measured in fp64, which the double leaves alone
        worst = max(worst, float((U64.T @ dW).norm() / dW.norm()), float((dW @ V64).norm() / dW.norm()))
    Wf, S64 = layer.weight.detach().double(), S.double()
    drift = max(float((Wf @ V64 - U64 * S64).norm() / S64.norm()),
                float((U64.T @ Wf - S64[:, None] * V64.T).norm() / S64.norm()))
    return worst, drift


def without_the_fix(monkeypatch):
    monkeypatch.setattr(asvd, "full_precision", lambda device_type: contextlib.nullcontext())


@pytest.mark.parametrize("autocast", [False, True], ids=["tf32", "bf16-autocast"])
def test_protection_is_exact_under_reduced_precision_matmuls(tf32_on, one_thread, autocast):
    with CudaMatmuls() as double:
        worst, drift = protected_muon_run(autocast=autocast)
    assert double.rounded > 0  # Newton-Schulz ran reduced; the projections did not
    assert worst <= LIMIT and drift <= LIMIT, (worst, drift)


@pytest.mark.parametrize("autocast", [False, True], ids=["tf32", "bf16-autocast"])
def test_without_full_precision_projections_the_protection_leaks(tf32_on, one_thread, autocast, monkeypatch):
    """The same run with the projections left to the process' matmul precision: what the H200 measured."""
    without_the_fix(monkeypatch)
    with CudaMatmuls():
        worst, drift = protected_muon_run(autocast=autocast)
    assert worst > LIMIT and drift > LIMIT, (worst, drift)


def test_the_model_keeps_tf32_outside_the_projection(tf32_on):
    """Only the protection's products are exact: a layer's forward (and anything else) stays TF32."""
    layer = AdaptiveSVDLinear(64, 64)
    layer.protect(torch.linalg.qr(torch.randn(64, 4))[0], torch.linalg.qr(torch.randn(64, 4))[0])
    with CudaMatmuls() as double:
        layer(torch.randn(8, 64))
        rounded = double.rounded
        layer.project(torch.randn(64, 64))
    assert rounded == 1 and double.rounded == 1 and double.exact == 4


def test_the_analysis_runs_at_full_precision_too(tf32_on, one_thread):
    """The warm SVD's certificate and the metrics compare residuals far below TF32's rounding."""
    from tests.test_adaptive_cycle import small_run

    _, model, hook, _, _ = small_run({"svd_interval": 1})
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    model(x, x.roll(-1, 1)).backward()
    with CudaMatmuls() as double:
        for step in (1, 2):  # the second analysis measures against the first one's basis
            hook.after_backward(step, False)
    assert double.exact > 0 and double.rounded == 0
