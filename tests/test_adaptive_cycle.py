"""AdaptiveSVDLinear with Muon (identity at k = 0, exact protected triples) and the analysis cycle on a live model:
switches that change nothing structural, optimizer state, compile, resume, fallbacks, the guide's Phase 1 run."""

import io
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from nanochat import adaptive_svd as asvd
from nanochat.adaptive_cycle import AdaptiveConfig, AdaptiveSVDHook
from nanochat.adaptive_svd import Action, Mode
from nanochat.checkpoint_manager import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from nanochat.common import UserError
from nanochat.gpt import GPT, AdaptiveSVDLinear, GPTConfig
from nanochat.hooks import Run
from nanochat.optim import Muon, build_optimizers, zeropower_via_newtonschulz5
from nanochat.run_files import JsonlLog
from nanochat.synthetic import planted
from nanochat.train import train
from tests.conftest import ROOT, tiny_model



def protected_pair(shape=(64, 48), k=6, seed=0):
    """Two copies of one layer with planted learned directions; returns (full, protected, U_k, S_k, V_k)."""
    W, _, _ = planted(*shape, j=k, seed=seed)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    layers = []
    for _ in range(2):
        layer = AdaptiveSVDLinear(shape[1], shape[0])
        with torch.no_grad():
            layer.weight.copy_(W)
        layers.append(layer)
    return layers[0], layers[1], U[:, :k], S[:k], Vh[:k].T


def muon_for(layer, lr=0.02):
    return Muon([("w", layer.weight)], lr=lr, momentum=0.95, layers={layer.weight: layer})


def test_k0_lowrank_is_full_mode_bit_for_bit_over_20_muon_steps():
    """Identity: protection with an empty basis changes nothing, momentum included."""
    full, low, U, _, V = protected_pair()
    low.protect(U[:, :0], V[:, :0])
    assert low.mode == "lowrank" and low.rank == min(low.weight.shape)
    opt_full, opt_low = muon_for(full), muon_for(low)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        G = torch.randn(full.weight.shape, generator=gen)
        full.weight.grad, low.weight.grad = G.clone(), G.clone()
        opt_full.step()
        opt_low.step()
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    full.weight.requires_grad_(False), low.weight.requires_grad_(False)
    assert rel(low.weight, full.weight) <= 1e-6
    assert rel(opt_low.state[low.weight]["momentum_buffer"], opt_full.state[full.weight]["momentum_buffer"]) <= 1e-6
    assert torch.equal(low.weight, full.weight)  # in fact bit-identical


def test_protected_triples_stay_exact_over_100_muon_steps_and_updates_have_rank_at_most_r():
    _, layer, U, S, V = protected_pair(shape=(96, 64), k=6, seed=1)
    layer.protect(U, V)
    opt = muon_for(layer, lr=0.05)
    gen = torch.Generator().manual_seed(1)
    for i in range(100):
        before = layer.weight.detach().clone()
        layer.weight.grad = torch.randn(layer.weight.shape, generator=gen) + U @ torch.randn(6, 64, generator=gen)
        opt.step()
        if i == 0:
            dW = layer.weight.detach() - before
            assert int(torch.linalg.matrix_rank(dW, rtol=1e-4)) <= 64 - 6
            assert float((U.T @ dW).norm() / dW.norm()) <= 1e-5 and float((dW @ V).norm() / dW.norm()) <= 1e-5
    W = layer.weight.detach()
    start = protected_pair(shape=(96, 64), k=6, seed=1)[0].weight.detach()
    assert float((W - start).norm() / start.norm()) > 0.1  # it trained, in its minor subspace
    assert float((W @ V - U * S).norm() / S.norm()) <= 1e-5
    assert float((U.T @ W - S[:, None] * V.T).norm() / S.norm()) <= 1e-5


def test_bf16_newton_schulz_leaks_nothing_into_the_protected_directions():
    """bf16 matmuls do not keep row and column spaces exactly; the projection after Newton-Schulz does."""
    _, layer, U, S, V = protected_pair(shape=(96, 64), k=6, seed=2)
    layer.protect(U, V)
    opt = Muon([("w", layer.weight)], lr=0.05, layers={layer.weight: layer}, ns_dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    worst = 0.0
    for _ in range(100):
        before = layer.weight.detach().clone()
        layer.weight.grad = torch.randn(layer.weight.shape, generator=gen) + U @ torch.randn(6, 64, generator=gen)
        opt.step()
        dW = layer.weight.detach() - before
        worst = max(worst, float((U.T @ dW).norm() / dW.norm()), float((dW @ V).norm() / dW.norm()))
    assert worst <= 1e-5
    W = layer.weight.detach()
    assert float((W @ V - U * S).norm() / S.norm()) <= 1e-5
    # without the second projection, bf16 Newton-Schulz does leak: the check above can fail
    o = zeropower_via_newtonschulz5(asvd.project(torch.randn(96, 64, generator=gen), U, V), dtype=torch.bfloat16).float()
    assert float((U.T @ o).norm() / o.norm()) > 1e-4


def test_state_dict_is_dense_and_loads_into_a_plain_linear():
    _, layer, U, _, V = protected_pair()
    layer.protect(U, V)
    sd = layer.state_dict()
    assert list(sd) == ["weight"]
    plain = torch.nn.Linear(48, 64, bias=False)
    plain.load_state_dict(sd)
    assert torch.equal(plain.weight, layer.weight)


# -- the cycle on a small live model ---------------------------------------------------------------

def small_run(cfg_overrides=None, depth=2, vocab=256, seq=32):
    cfg = AdaptiveConfig(**{"depth": depth, "svd_targets": "attn", "adaptive_svd_target_layer": -1, **(cfg_overrides or {})})
    model = tiny_model(depth, vocab, seq)
    with torch.no_grad():
        for b, block in enumerate(model.transformer.h):  # zero-initialised projections give zero gradients upstream
            n = block.attn.c_proj.weight.shape[0]
            # attention output projections get 4 learned directions above a random bulk, so k > 0 there
            block.attn.c_proj.weight.copy_(planted(n, n, 4, seed=b)[0])
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


def flip_every_analysis(metrics, state, policy, step):
    """A stand-in for decide(): every layer switches at every analysis after its first."""
    if state.analyses == 0:
        return asvd.Action.KEEP, "initial_svd_baseline", {}
    return (asvd.Action.TO_LOWRANK if state.mode == Mode.FULL else asvd.Action.TO_FULL), "scripted", {}


def test_switch_projects_momentum_once_and_touches_nothing_else(monkeypatch):
    monkeypatch.setattr(asvd, "decide", flip_every_analysis)
    cfg, model, hook, muon, adamw = small_run({"svd_interval": 2, "svd_targets": "all"})
    params_before = [p for p in model.parameters()]
    groups_before = [list(g["params"]) for g in muon.param_groups + adamw.param_groups]
    for n in range(1, 4):
        step(model, muon, adamw, hook, n, n)  # analyses at 2: baseline
    torch.manual_seed(4)
    x = torch.randint(0, 256, (2, 32))
    model(x, x.roll(-1, 1)).backward()
    proj = hook.layers["block0.attn.c_proj"].module
    untouched = {muon.names[p]: muon.state[p]["momentum_buffer"].clone() for p in muon.params()
                 if not any(p is layer.module.weight for layer in hook.layers.values())}
    adam_before = {id(p): {k: v.clone() for k, v in adamw.state[p].items()} for p in adamw.state}
    M = muon.state[proj.weight]["momentum_buffer"].clone()
    hook.after_backward(4, False)  # every layer switches to low rank here
    assert all(layer.module.mode == "lowrank" for layer in hook.layers.values())
    assert proj.U_k.shape[1] > 0, "the test needs learned directions in c_proj"
    assert torch.allclose(muon.state[proj.weight]["momentum_buffer"], asvd.project(M, proj.U_k, proj.V_k), atol=1e-7)
    for p in muon.params():
        if muon.names[p] in untouched:
            assert torch.equal(muon.state[p]["momentum_buffer"], untouched[muon.names[p]])
    for p in adamw.state:
        for k, v in adamw.state[p].items():
            assert torch.equal(v, adam_before[id(p)][k])
    W = proj.weight.detach().clone()
    muon.step()  # no skipped step: the layer moves on this very step, only in its minor subspace
    dW = proj.weight.detach() - W
    assert dW.norm() > 0 and float((proj.U_k.T @ dW).norm() / dW.norm()) < 1e-5
    adamw.step()
    model.zero_grad(set_to_none=True)
    step(model, muon, adamw, hook, 5, 5)
    step(model, muon, adamw, hook, 6, 6)  # back to full
    assert all(layer.module.mode == "full" for layer in hook.layers.values()) and hook.switches == {"to_lowrank": 12, "to_full": 12}
    assert [p for p in model.parameters()] == params_before
    assert [list(g["params"]) for g in muon.param_groups + adamw.param_groups] == groups_before


def test_failed_svd_skips_the_layer_without_crashing(monkeypatch):
    cfg, model, hook, muon, adamw = small_run({"svd_interval": 1})
    monkeypatch.setattr(asvd, "svd", lambda *a, **k: asvd.SVDResult(reason="injected failure"))
    step(model, muon, adamw, hook, 1, 0)
    records = [d for _, d in hook.logged]
    assert records and all(not any(isinstance(v, float) and v != v for v in d.values()) for d in records)
    assert all(layer.module.mode == "full" and layer.state.analyses == 0 for layer in hook.layers.values())


def test_the_mode_and_action_words_are_what_the_jsonl_and_the_console_carry(monkeypatch, tmp_path, capsys):
    """Readers compare svd_metrics.jsonl fields with the enums and people read the console: both must carry
    exactly the enum values (and the guide's SWITCHED wording), through a switch each way and a failed SVD."""
    assert [m.value for m in Mode] == ["full", "lowrank"]
    assert [a.value for a in Action] == ["to_lowrank", "to_full", "keep", "skipped"]
    cfg, model, hook, muon, adamw = small_run({"svd_interval": 1})
    hook.metrics_log = JsonlLog(str(tmp_path / "svd_metrics.jsonl"))
    monkeypatch.setattr(asvd, "decide", flip_every_analysis)
    for n in (1, 2, 3):  # baseline, to low rank, back to full
        step(model, muon, adamw, hook, n, n)
    monkeypatch.setattr(asvd, "decide", lambda *a: (Action.KEEP, "scripted", {}))
    step(model, muon, adamw, hook, 4, 4)
    monkeypatch.setattr(asvd, "svd", lambda *a, **k: asvd.SVDResult(reason="injected failure"))
    step(model, muon, adamw, hook, 5, 5)
    hook.metrics_log.close()
    lines = (tmp_path / "svd_metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["action"] for r in records[::len(hook.layers)]] == ["keep", "to_lowrank", "to_full", "keep", "skipped"]
    assert [r["mode"] for r in records[::len(hook.layers)]] == ["full", "full", "lowrank", "full", "full"]
    for r in records[:-len(hook.layers)]:
        assert r["mode_after"] == Action(r["action"]).mode_after(Mode(r["mode"]))
    assert '"mode": "lowrank"' in "".join(lines) and '"mode_after": "lowrank"' in "".join(lines)
    out = capsys.readouterr().out
    assert "SWITCHED TO LOW-RANK (r=" in out and "SWITCHED TO FULL MATRIX" in out
    assert " mode=full k=" in out and " mode=lowrank k=" in out and "Decision: scripted (mode=full, r=" in out
    assert "Mode." not in out and "Action." not in out


def test_the_checkpointed_layer_state_is_plain_strings_and_loads(monkeypatch):
    """A checkpoint holds the mode as a plain string (torch.load(weights_only=True) reads no enum, and
    checkpoints written before the enum hold one); loading it restores the mode and the protection."""
    cfg, model, hook, muon, adamw = small_run({"svd_interval": 1})
    monkeypatch.setattr(asvd, "decide", flip_every_analysis)
    for n in (1, 2):
        step(model, muon, adamw, hook, n, n)
    buf = io.BytesIO()
    torch.save(hook.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert {type(entry["mode"]) for entry in sd["layers"].values()} == {str}
    assert {entry["mode"] for entry in sd["layers"].values()} == {"lowrank"}
    _, _, fresh, _, _ = small_run()
    fresh.load_state_dict(sd)
    for name, layer in fresh.layers.items():
        assert layer.state.mode is Mode.LOWRANK and layer.module.mode is Mode.LOWRANK
        assert torch.equal(layer.module.U_k, hook.layers[name].module.U_k)


def test_svd_falls_back_to_cpu_when_the_device_has_none(monkeypatch, capsys):
    """What MPS does: the first linalg.svd call (on the model's device) raises NotImplementedError.
    The engine remembers such a device in a module-level set: a private one here, so the rest of the
    session does not inherit 'cpu' as a device without SVD."""
    monkeypatch.setattr(asvd, "_CPU_LINALG_DEVICE_TYPES", set())
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


def test_a_layer_with_nothing_learned_is_never_reported_switched(capsys):
    """Static policy at the first analysis: the attention output projections have 4 learned directions and
    are protected; c_q, c_k and c_v (random init: k = 0) would be protected with nothing: no SWITCHED line,
    no switch counted, lowrank = 0 in the logged data, and the layer trains fully."""
    cfg, model, hook, muon, adamw = small_run({"svd_policy": "static"})
    step(model, muon, adamw, hook, 1, 0)
    out = capsys.readouterr().out
    protected = {name for name, layer in hook.layers.items() if layer.module.mode == Mode.LOWRANK}
    assert protected == {"block0.attn.c_proj", "block1.attn.c_proj"}
    assert out.count("SWITCHED TO LOW-RANK") == 2 and hook.switches[Action.TO_LOWRANK] == 2
    assert "[block0.attn.c_q] SWITCHED" not in out and "[block0.attn.c_q] Initial SVD computed (k=0" in out
    logged = {k: v for _, d in hook.logged for k, v in d.items() if k.endswith("/lowrank")}
    assert logged == {f"svd/{name}/lowrank": int(name in protected) for name in hook.layers}


def test_static_on_weights_with_nothing_learned_stops_with_one_line(base, tmp_path, cli):
    """A fresh run under the static policy: random init has no learned direction in any target, so the run
    would be the baseline while reporting protection. It stops at its first analysis, naming --init_from."""
    code, out, err = cli("scripts.base_train_adaptive_svd", "--depth=2", "--max_seq_len=64", "--device_batch_size=1",
                         "--total_batch_size=64", "--num_iterations=5", "--eval_tokens=64", "--eval_every=-1",
                         "--device_type=cpu", "--svd_policy=static", f"--output_dir={tmp_path}")
    assert code != 0 and err.count("\n") == 1 and "--init_from" in err and "static" in err, err
    assert "SWITCHED" not in out and "Traceback" not in err


def test_the_clamp_is_logged_when_it_binds_and_the_dial_goes_beyond_it(tmp_path, capsys):
    """c_proj has 4 learned directions; with the clamp at 1 (1% of 128) k = 1, and the record says so. The
    protection dial protects its share of g whatever the count, beyond the clamp (static: from step 1)."""
    cfg, model, hook, muon, adamw = small_run({"svd_interval": 1, "svd_k_max_frac": 0.01})
    hook.metrics_log = JsonlLog(str(tmp_path / "svd_metrics.jsonl"))
    step(model, muon, adamw, hook, 1, 0)
    hook.metrics_log.close()
    records = {r["layer"]: r for r in map(json.loads, (tmp_path / "svd_metrics.jsonl").read_text().splitlines())}
    proj = records["block0.attn.c_proj"]
    assert (proj["k"], proj["k_learned"], proj["k_clamped"]) == (1, 4, True)
    assert records["block0.attn.c_q"]["k_clamped"] is False and "(clamped from 4)" in capsys.readouterr().out
    cfg, model, hook, muon, adamw = small_run({"svd_policy": "static", "svd_protect_frac": 0.5})
    step(model, muon, adamw, hook, 1, 0)
    g = min(hook.layers["block0.attn.c_q"].module.weight.shape)
    assert all(layer.module.mode == Mode.LOWRANK and layer.module.rank == g - g // 2 for layer in hook.layers.values())


def test_target_resolution_and_validation():
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(3, 128, 16))
    hook = AdaptiveSVDHook(AdaptiveConfig(depth=3, adaptive_svd_target_layer=-1, svd_targets="attn,c_fc,mlp"))
    hook.prepare_model(model)
    assert len(hook.layers) == 18 and "block2.attn.c_v" in hook.layers and "block1.mlp.c_proj" in hook.layers
    assert isinstance(model.transformer.h[2].mlp.c_fc, AdaptiveSVDLinear)
    bad = [dict(adaptive_svd_target_layer=5), dict(svd_targets="c_x"), dict(svd_targets=" , "), dict(svd_interval=0),
           dict(svd_exit_p=1e-4), dict(svd_method="fast"), dict(svd_policy="sometimes")]
    for overrides in bad:
        with pytest.raises(UserError):
            AdaptiveSVDHook(AdaptiveConfig(depth=3, **overrides))


def test_bad_targets_stop_the_script_before_anything_slow(tmp_path, cli):
    """--svd_targets and the policy are checked before data, tokenizer or model: no data exists here."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "scripts.base_train_adaptive_svd", "--depth=2", "--svd_targets=c_x"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr == "error: --svd_targets=c_x is not valid: use a comma list of c_q, c_k, c_v, " \
                                             "c_proj, c_fc, mlp.c_proj, attn, mlp or all\n", r.stderr
    code, _, err = cli("scripts.base_train_adaptive_svd", "--depth=2", "--svd_exit_p=1e-4")
    assert code == 2 and err.count("\n") == 1 and "must be above --svd_alpha" in err and "tokenizer" not in err


COMPILE_RUN = """
import json, sys, torch, torch._dynamo
sys.path.insert(0, {root!r})
from nanochat import adaptive_svd as asvd
from tests.test_adaptive_cycle import flip_every_analysis, small_run, step
asvd.decide = flip_every_analysis
count = [0]
def backend(gm, example_inputs):
    count[0] += 1
    return gm.forward
cfg, model, hook, muon, adamw = small_run(dict(svd_interval=1, svd_targets="all", compile=True))
compiled = torch.compile(model, backend=backend, dynamic=False)
params = [id(p) for p in model.parameters()]
counts, modes = [], []
for n in range(1, 9):
    step(model, muon, adamw, hook, n, n, forward=compiled)
    counts.append(count[0])
    modes.append(hook.layers["block0.attn.c_proj"].module.mode)
print(json.dumps(dict(counts=counts, modes=modes, switches=hook.switches, same_params=params == [id(p) for p in model.parameters()])))
"""


def test_switches_both_ways_under_compile_never_recompile():
    """Under torch.compile (a counting backend), with every layer switching at every analysis, the
    graph is compiled once and never again, and TORCH_LOGS=recompiles has nothing to say."""
    env = dict(os.environ, TORCH_LOGS="recompiles")
    r = subprocess.run([sys.executable, "-c", COMPILE_RUN.format(root=ROOT)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["modes"][1:] == ["lowrank", "full"] * 3 + ["lowrank"] and out["switches"]["to_full"] == 3 * 12
    assert out["counts"] == [1] * 8 and out["same_params"]
    assert "Recompiling" not in r.stderr and "recompil" not in r.stderr.lower(), r.stderr[-2000:]


# -- end to end through the training loop ----------------------------------------------------------

# runs compared here must not each time bf16 against fp32 (--dtype=auto) on their own
TINY = dict(depth=2, max_seq_len=64, device_batch_size=2, total_batch_size=256, eval_tokens=1024, sample_every=-1,
            device_type="cpu", dtype="float32", eval_every=-1, svd_interval=2, adaptive_svd_target_layer=-1, svd_targets="all",
            svd_protect_frac=0.1, svd_alpha=0.6, svd_exit_p=0.7, svd_patience=1)  # protect 10% of g; switch on noise


class StopAt(AdaptiveSVDHook):
    at = None

    def after_backward(self, step, last_step):
        super().after_backward(step, last_step)
        if step == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)


def as_older_checkpoint(run_dir):
    """Rewrite a run's checkpoint as the loop wrote it before its state was one LoopState and the hook's key
    neutral: the hook's state under "adaptive", the latest val bpb and CORE result only in the metadata."""
    ckpt = load_checkpoint(os.path.join(run_dir, CHECKPOINT_NAME))
    ckpt["adaptive"] = ckpt.pop("hook")
    for key in ("val_bpb", "core"):
        del ckpt["loop"][key]
    config = ckpt.pop("config")
    config["adaptive"] = config.pop("hook")
    save_checkpoint(run_dir, ckpt, config)


def test_lowrank_checkpoint_resume_is_exact_also_from_an_older_checkpoint(base, tmp_path):
    cfg = dict(TINY, num_iterations=10, svd_shift_window=2)  # the shift reading's history resumes too
    full = train(AdaptiveConfig(**cfg, output_dir=str(tmp_path / "a")), hook=AdaptiveSVDHook(AdaptiveConfig(**cfg)))
    hook = StopAt(AdaptiveConfig(**cfg))
    hook.at = 7
    first = train(AdaptiveConfig(**cfg, output_dir=str(tmp_path / "b")), hook=hook)
    assert first["step"] == 7 and any(layer.module.mode == "lowrank" for layer in hook.layers.values()), "the test needs a low-rank layer at the stop"
    shutil.copytree(tmp_path / "b", tmp_path / "old")
    as_older_checkpoint(tmp_path / "old/base_checkpoints/d2")
    a = [json.loads(line) for line in open(tmp_path / "a/base_checkpoints/d2/svd_metrics.jsonl")]
    for run in ("b", "old"):
        resumed_cfg = AdaptiveConfig(**cfg, output_dir=str(tmp_path / run), resume=True)
        rest = train(resumed_cfg, hook=AdaptiveSVDHook(resumed_cfg))
        assert first["losses"] + rest["losses"] == full["losses"], run
        b = [json.loads(line) for line in open(tmp_path / run / "base_checkpoints/d2/svd_metrics.jsonl")]
        keys = ("step", "layer", "action", "r_after", "alignment_ratio", "alignment_p", "alignment_shift")
        assert [tuple(r.get(key) for key in keys) for r in a] == [tuple(r.get(key) for key in keys) for r in b], run
        assert any(r.get("alignment_shift") is not None for r in b if r["step"] > 7), run
        ckpt = torch.load(tmp_path / run / "base_checkpoints/d2/checkpoint.pt")
        assert "adaptive" not in ckpt and set(ckpt["hook"]["layers"]) == set(hook.layers)
        GPT(GPTConfig(**ckpt["metadata"]["model_config"])).load_state_dict(ckpt["model"])


def test_phase1_style_run_and_the_guides_snippet(base, tmp_path, cli, capsys):
    """The researcher's command shape (scaled down) from a fresh directory, then the guide's snippet verbatim
    (both in this process; the slow GPU-check test runs the same as separate processes)."""
    code, out, err = cli("scripts.base_train_adaptive_svd", "--depth=4", "--max_seq_len=64", "--device_batch_size=1",
                         "--eval_tokens=64", "--core_metric_every=-1", "--total_batch_size=64", "--num_iterations=40",
                         "--device_type=cpu", cwd=tmp_path)
    assert code == 0, err[-2000:]
    for s in (20, 40):
        assert f"=== SVD Analysis at step {s} ===" in out
    assert "[block0.attn.c_q] Initial SVD computed" in out and "=== SVD Analysis complete ===" in out
    assert "principal_alignment=" in out and "subspace_angle=" in out
    assert (tmp_path / "base_checkpoints/d4/checkpoint.pt").exists() and (tmp_path / "base_checkpoints/d4/config.json").exists()
    lines = [json.loads(line) for line in open(tmp_path / "base_checkpoints/d4/svd_metrics.jsonl")]
    assert [x["step"] for x in lines] == [20, 40]
    path = os.path.join(ROOT, "experiments", "guide_snippet.py")
    exec(compile(open(path).read(), path, "exec"), {})  # cwd is still tmp_path: the snippet's relative path
    assert capsys.readouterr().out.startswith("<|bos|>The capital of France is")
