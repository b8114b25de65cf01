"""AdaptiveSVDLinear and the analysis cycle on a live model: exact switches, optimizer state, resume, fallbacks."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from nanochat import adaptive_svd as asvd
from nanochat.adaptive_cycle import AdaptiveConfig, AdaptiveSVDHook, resolve_targets
from nanochat.common import UserError
from nanochat.gpt import GPT, AdaptiveSVDLinear, GPTConfig
from nanochat.optim import build_optimizers
from nanochat.train import Run, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_layer(n_out=48, n_in=32, seed=0):
    torch.manual_seed(seed)
    layer = AdaptiveSVDLinear(n_in, n_out)
    torch.nn.init.normal_(layer.weight, std=0.2)
    return layer


def exact(W):
    U, S, Vh = torch.linalg.svd(W.detach().float(), full_matrices=False)
    return U, S, Vh


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (40, 40)])
def test_switch_and_resplit_preserve_the_function(shape):
    layer = random_layer(*shape)
    x = torch.randn(16, shape[1])
    y0 = layer(x).detach()
    layer.to_lowrank(*exact(layer.weight), r=20)
    assert layer.B.shape == (shape[0], 20) and layer.A.shape == (20, shape[1])
    assert (layer(x) - y0).abs().max() < 1e-5
    with torch.no_grad():  # let the factors learn something, then re-split at a smaller r
        layer.B.add_(torch.randn_like(layer.B) * 0.05)
    y1 = layer(x).detach()
    layer.to_lowrank(*exact(layer.effective_weight()), r=12)
    assert layer.B.shape == (shape[0], 12) and layer.A.shape == (12, shape[1])
    assert (layer(x) - y1).abs().max() < 1e-5
    layer.to_full()
    assert layer.mode == "full" and layer.B is None
    assert (layer(x) - y1).abs().max() < 1e-5


def test_milora_initialisation_uses_the_minor_triples():
    layer = random_layer()
    U, S, Vh = exact(layer.weight)
    layer.to_lowrank(U, S, Vh, r=10)
    k = 32 - 10
    assert torch.allclose(layer.B @ layer.A, (U[:, k:] * S[k:]) @ Vh[k:], atol=1e-5)
    assert torch.allclose(layer.B.T @ layer.B, torch.diag(S[k:]), atol=1e-5)  # B = U_m sqrt(S_m)
    assert torch.allclose(layer.weight, (U[:, :k] * S[:k]) @ Vh[:k], atol=1e-5)


def test_gradient_of_the_effective_weight_in_lowrank_mode():
    layer = random_layer()
    dense = torch.nn.Linear(32, 48, bias=False)
    layer.to_lowrank(*exact(layer.weight), r=10)
    with torch.no_grad():
        dense.weight.copy_(layer.effective_weight())
    x, t = torch.randn(8, 32), torch.randn(8, 48)
    F.mse_loss(layer(x), t).backward()
    F.mse_loss(dense(x), t).backward()
    G = dense.weight.grad
    assert torch.allclose(layer.weight.grad, G, atol=1e-6)  # dL/dW_eff in low-rank mode
    assert torch.allclose(layer.B.grad, G @ layer.A.detach().T, atol=1e-6)
    assert torch.allclose(layer.A.grad, layer.B.detach().T @ G, atol=1e-6)


def test_state_dict_is_dense_and_loads_into_a_plain_linear():
    layer = random_layer()
    layer.to_lowrank(*exact(layer.weight), r=10)
    with torch.no_grad():
        layer.A.add_(0.1)
    sd = layer.state_dict()
    assert list(sd) == ["weight"]
    plain = torch.nn.Linear(32, 48, bias=False)
    plain.load_state_dict(sd)
    assert torch.allclose(plain.weight, layer.effective_weight(), atol=1e-6)


def test_protection_keeps_principal_triples_exact():
    layer = random_layer()
    layer.protect = True
    U, S, Vh = exact(layer.weight)
    layer.to_lowrank(U, S, Vh, r=12)
    k = 32 - 12
    x = torch.randn(64, 32)
    opt = torch.optim.SGD([layer.B, layer.A], lr=0.5)
    for _ in range(20):
        F.mse_loss(layer(x), torch.randn(64, 48) * 3).backward()
        layer.project_factor_grads()
        opt.step()
        opt.zero_grad()
    U2, S2, Vh2 = exact(layer.effective_weight())
    # the frozen triples are still singular triples of W_eff: W_eff V_k = U_k S_k and U_k^T W_eff = S_k V_k^T
    W = layer.effective_weight().detach()
    assert torch.allclose(W @ Vh[:k].T, U[:, :k] * S[:k], atol=1e-5)
    assert torch.allclose(U[:, :k].T @ W, S[:k, None] * Vh[:k], atol=1e-5)
    assert (layer.protect_U.T @ layer.B.detach()).abs().max() < 1e-5


# -- the cycle on a small live model ---------------------------------------------------------------

def small_run(cfg_overrides=None, depth=2, vocab=256, seq=32):
    cfg = AdaptiveConfig(**{"depth": depth, "svd_targets": "attn", "adaptive_svd_target_layer": -1, **(cfg_overrides or {})})
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(depth, vocab, seq))
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for block in model.transformer.h:  # zero-initialised projections give zero gradients upstream
            block.attn.c_proj.weight.normal_(0, 0.02)
            block.mlp.c_proj.weight.normal_(0, 0.02)
        model.lm_head.weight.normal_(0, 0.02)
    hook = AdaptiveSVDHook(cfg)
    hook.prepare_model(model)
    muon, adamw = build_optimizers(model, 0.02, 0.2, 0.004)
    logged = []
    run = Run(cfg, model, muon, adamw, torch.device("cpu"), "/nonexistent", lambda d, s: logged.append((s, d)), 1, 1)
    hook.attach(run)  # rank 1: no file output
    hook.logged = logged
    return cfg, model, hook, muon, adamw


def step(model, muon, adamw, hook, n, seed, forward=None):
    torch.manual_seed(seed)
    x = torch.randint(0, 256, (2, 32))
    (model if forward is None else forward)(x, x.roll(-1, 1)).backward()
    hook.after_backward(n, False)
    muon.step()
    adamw.step()
    model.zero_grad(set_to_none=True)


FORCE_LOWRANK = {"svd_ratio_danger": 1e-6, "svd_patience": 1}


def test_switch_leaves_other_optimizer_state_bit_identical_and_carries_momentum():
    cfg, model, hook, muon, adamw = small_run(dict(FORCE_LOWRANK, svd_interval=2))
    step(model, muon, adamw, hook, 1, 0)
    step(model, muon, adamw, hook, 2, 1)  # baseline analysis
    step(model, muon, adamw, hook, 3, 2)
    torch.manual_seed(3)
    x = torch.randint(0, 256, (2, 32))
    model(x, x.roll(-1, 1)).backward()
    q = model.transformer.h[0].attn.c_q
    M_W = muon.state[q.weight]["momentum_buffer"].clone()
    untouched = {muon.names[p]: muon.state[p]["momentum_buffer"].clone() for p in muon.params()
                 if not isinstance(dict(model.named_modules())[muon.names[p].rsplit(".", 1)[0]], AdaptiveSVDLinear)}
    adam_before = {id(p): {k: v.clone() for k, v in adamw.state[p].items()} for p in adamw.state}
    G = q.weight.grad.clone()
    hook.after_backward(4, False)  # the switch happens here
    assert q.mode == "lowrank"
    for p in muon.params():
        name = muon.names[p]
        if name in untouched:
            assert torch.equal(muon.state[p]["momentum_buffer"], untouched[name])
    for p in adamw.state:
        for k, v in adamw.state[p].items():
            assert torch.equal(v, adam_before[id(p)][k])
    B, A = q.B.detach(), q.A.detach()
    assert torch.allclose(muon.state[q.B]["momentum_buffer"], M_W @ A.T, atol=1e-6)
    assert torch.allclose(muon.state[q.A]["momentum_buffer"], B.T @ M_W, atol=1e-6)
    assert torch.allclose(q.B.grad, G @ A.T, atol=1e-6) and torch.allclose(q.A.grad, B.T @ G, atol=1e-6)
    assert q.weight not in set(muon.params()) and q.B in set(muon.params())
    w_before = q.effective_weight().detach().clone()
    muon.step()  # no skipped step: the factors move on this very step
    assert not torch.equal(q.effective_weight().detach(), w_before)


def test_switch_back_to_full_and_rank_shrinks():
    overrides = dict(FORCE_LOWRANK, svd_interval=1, svd_minor_change_tol=10.0, svd_rank_min=4,
                     svd_angle_max=10.0, svd_trainable_fraction_min=0.0)  # no way back to full in the first phase
    cfg, model, hook, muon, adamw = small_run(overrides)
    q = model.transformer.h[0].attn.c_q
    shapes = []
    for n in range(1, 5):
        step(model, muon, adamw, hook, n, n)
        shapes.append(None if q.B is None else tuple(q.B.shape))
    assert shapes[0] is None and shapes[1] is not None
    assert shapes[2][1] < shapes[1][1] and shapes[3][1] < shapes[2][1]  # r shrinks, B really changes shape
    # make low rank look unable to follow the gradient: it must go back to full after patience (1)
    hook.policy = asvd.SVDPolicy(**{**hook.policy.__dict__, "svd_trainable_fraction_min": 1.01, "svd_ratio_danger": 1e9})
    for n in range(5, 7):  # step 5 switches back; step 6 is held by hysteresis
        step(model, muon, adamw, hook, n, n)
    assert q.mode == "full" and hook.switches["to_full"] >= 1
    assert q.weight in set(muon.params())
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_failed_svd_skips_the_layer_without_crashing(monkeypatch):
    cfg, model, hook, muon, adamw = small_run({"svd_interval": 1})
    monkeypatch.setattr(asvd, "svd", lambda *a, **k: asvd.SVDResult(reason="injected failure"))
    step(model, muon, adamw, hook, 1, 0)
    records = [d for _, d in hook.logged]
    assert records and all(not any(isinstance(v, float) and v != v for v in d.values()) for d in records)
    assert all(m.mode == "full" for _, m in hook.layers.values())


def test_svd_falls_back_to_cpu_when_the_device_has_none(monkeypatch, capsys):
    """What MPS does: the first linalg.svd call (on the model's device) raises NotImplementedError."""
    real = torch.linalg.svd
    calls = []

    def no_svd_on_model_device(A, *args, **kwargs):
        calls.append(A.data_ptr())
        if len(calls) == 1:
            raise NotImplementedError("The operator 'aten::_linalg_svd.U' is not currently implemented for the MPS device")
        return real(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", no_svd_on_model_device)
    # the engine remembers devices without kernels for the process: forget "cpu" again after this test
    monkeypatch.setattr(asvd, "_CPU_LINALG_DEVICE_TYPES", set())
    cfg, model, hook, muon, adamw = small_run({"svd_interval": 1})
    step(model, muon, adamw, hook, 1, 0)
    assert len(calls) >= 2
    assert "SVD failed" not in capsys.readouterr().out


def test_target_resolution():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(3, 128, 16))
    assert [d for d, *_ in resolve_targets(model, 0, "c_q")] == ["block0.attn.c_q"]
    names = [d for d, *_ in resolve_targets(model, -1, "attn")]
    assert len(names) == 12 and "block2.attn.c_v" in names
    assert [d for d, *_ in resolve_targets(model, 1, "mlp")] == ["block1.mlp.c_fc", "block1.mlp.c_proj"]
    with pytest.raises(UserError):
        resolve_targets(model, 5, "c_q")
    with pytest.raises(UserError):
        resolve_targets(model, 0, "c_x")


def test_compile_recompiles_once_per_switch_and_not_per_rank_change():
    count = [0]

    def backend(gm, example_inputs):
        count[0] += 1
        return gm.forward

    import torch._dynamo
    torch._dynamo.reset()
    cfg, model, hook, muon, adamw = small_run(dict(FORCE_LOWRANK, svd_interval=1, svd_minor_change_tol=10.0, svd_rank_min=4,
                                                   adaptive_svd_target_layer=0, svd_targets="c_q", compile="true"))
    hook.compiling = True
    torch._dynamo.config.force_parameter_static_shapes = False
    compiled = torch.compile(model, backend=backend)
    counts = []
    for n in range(1, 6):
        step(model, muon, adamw, hook, n, n, forward=compiled)
        counts.append(count[0])
    torch._dynamo.reset()
    torch._dynamo.config.force_parameter_static_shapes = True
    # step 1: first compile; step 2's analysis switches (reset); step 3 recompiles once; r keeps shrinking after
    assert hook.switches["to_lowrank"] == 1
    assert counts[-1] - counts[0] <= hook.switches["to_lowrank"] + hook.switches["to_full"] + 1


# -- end to end through the training loop ----------------------------------------------------------

TINY = dict(depth=2, max_seq_len=64, device_batch_size=2, total_batch_size=256, eval_tokens=1024, sample_every=-1,
            device_type="cpu", eval_every=-1, svd_interval=2, adaptive_svd_target_layer=-1, svd_targets="attn",
            svd_ratio_danger=1.05, svd_patience=1)


@pytest.fixture
def base(prepared_base, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(prepared_base))
    return prepared_base


class StopAt(AdaptiveSVDHook):
    at = None

    def after_backward(self, step, last_step):
        super().after_backward(step, last_step)
        if step == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_lowrank_checkpoint_resume_is_exact(base, tmp_path):
    cfg = dict(TINY, num_iterations=10)
    full = train(AdaptiveConfig(**cfg, output_dir=str(tmp_path / "a")), hook=AdaptiveSVDHook(AdaptiveConfig(**cfg)))
    hook = StopAt(AdaptiveConfig(**cfg))
    hook.at = 7
    first = train(AdaptiveConfig(**cfg, output_dir=str(tmp_path / "b")), hook=hook)
    assert first["step"] == 7 and any(m.mode == "lowrank" for _, m in hook.layers.values()), "the test needs a low-rank layer at the stop"
    resumed_cfg = AdaptiveConfig(**cfg, output_dir=str(tmp_path / "b"), resume=True)
    rest = train(resumed_cfg, hook=AdaptiveSVDHook(resumed_cfg))
    assert first["losses"] + rest["losses"] == full["losses"]
    a = [json.loads(line) for line in open(tmp_path / "a/base_checkpoints/d2/svd_metrics.jsonl")]
    b = [json.loads(line) for line in open(tmp_path / "b/base_checkpoints/d2/svd_metrics.jsonl")]
    assert [(r["step"], r["layer"], r["action"], r.get("r_after")) for r in a] == \
           [(r["step"], r["layer"], r["action"], r.get("r_after")) for r in b]
    ckpt = torch.load(tmp_path / "b/base_checkpoints/d2/checkpoint.pt")
    GPT(GPTConfig(**ckpt["metadata"]["model_config"])).load_state_dict(ckpt["model"])


def test_phase1_style_run_and_the_guides_snippet(base, tmp_path):
    """The researcher's command shape (scaled down) from a fresh directory, then the guide's snippet verbatim."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base))
    cmd = [sys.executable, "-m", "scripts.base_train_adaptive_svd", "--depth=4", "--max_seq_len=64", "--device_batch_size=1",
           "--eval_tokens=64", "--core_metric_every=-1", "--total_batch_size=64", "--num_iterations=40", "--device_type=cpu"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    for s in (20, 40):
        assert f"=== SVD Analysis at step {s} ===" in out
    assert "[block0.attn.c_q] Initial SVD computed" in out and "=== SVD Analysis complete ===" in out
    assert "principal_alignment=" in out and "subspace_angle=" in out
    assert (tmp_path / "base_checkpoints/d4/checkpoint.pt").exists() and (tmp_path / "base_checkpoints/d4/config.json").exists()
    lines = [json.loads(line) for line in open(tmp_path / "base_checkpoints/d4/svd_metrics.jsonl")]
    assert [x["step"] for x in lines] == [20, 40]
    snippet = open(os.path.join(os.path.dirname(__file__), "guide_snippet.py")).read()
    r = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("<|bos|>The capital of France is")
