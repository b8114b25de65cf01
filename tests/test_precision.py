"""Matmul precision (--dtype): the fp32 path is the fp32 computation of before the flag, auto's decision is recorded and reused
on resume, and the bf16 paths (model, fused cross-entropy, Newton-Schulz) agree with fp32."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from nanochat import precision
from nanochat.checkpoint_manager import CHECKPOINT_NAME
from nanochat.common import UserError
from nanochat.dataloader import DataLoader
from nanochat.gpt import GPT, SOFTCAP, GPTConfig, SoftcapCrossEntropyMean
from nanochat.jobs import write_command
from nanochat.optim import Muon, build_optimizers, muon_momentum, zeropower_via_newtonschulz5
from nanochat.tokenizer import get_tokenizer
from nanochat.train import TrainConfig, clip_gradients, lr_multiplier, train
from tests.conftest import StopAt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = dict(depth=2, max_seq_len=64, device_batch_size=2, total_batch_size=256, eval_tokens=1024,
           num_iterations=6, eval_every=-1, sample_every=-1, device_type="cpu")


@pytest.fixture
def base(prepared_base, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(prepared_base))
    return prepared_base


def fp32_reference(cfg):
    """The same training as train(cfg), written out as fp32 training was before --dtype existed: no autocast
    anywhere, Newton-Schulz in fp32, the loop's own schedule functions. Returns (per-step losses, weights)."""
    torch.manual_seed(cfg.seed)
    tokenizer = get_tokenizer()
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(cfg.depth, tokenizer.get_vocab_size(), cfg.max_seq_len))
    model.to_empty(device="cpu")
    model.init_weights()
    muon, adamw = build_optimizers(model, cfg.matrix_lr, cfg.embedding_lr, cfg.unembedding_lr, cfg.weight_decay,
                                   ns_dtype=torch.float32)
    trained = muon.params() + [p for g in adamw.param_groups for p in g["params"]]
    batches = iter(DataLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, "train", "cpu"))
    accum = cfg.total_batch_size // (cfg.device_batch_size * cfg.max_seq_len)
    losses = []
    for step in range(cfg.num_iterations):
        micro = []
        for _ in range(accum):
            x, y = next(batches)
            loss = model(x, y)
            micro.append(loss.detach())
            (loss / accum).backward()
        clip_gradients(model, cfg.grad_clip, trained)
        lrm = lr_multiplier(step, cfg.num_iterations, cfg.warmup_ratio, cfg.warmdown_ratio, cfg.final_lr_frac)
        for opt in (muon, adamw):
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * lrm
        muon.param_groups[0]["momentum"] = muon_momentum(step)
        muon.step()
        adamw.step()
        model.zero_grad(set_to_none=True)
        losses.append(torch.stack(micro).mean().item())
    return losses, model.state_dict()


def test_fp32_run_is_the_fp32_computation_of_before_the_dtype_flag(base, tmp_path, one_thread):
    # Both sides run in this process on one thread, so the same fp32 operations give the same bits on any CPU
    # (the comparison is to a reference computed here, never to numbers recorded on another machine).
    cfg = TrainConfig(**RUN, dtype="float32", output_dir=str(tmp_path))
    result = train(cfg)
    losses, weights = fp32_reference(cfg)
    assert result["losses"] == losses
    saved = torch.load(os.path.join(result["ckpt_dir"], CHECKPOINT_NAME), map_location="cpu")["model"]
    assert saved.keys() == weights.keys() and all(torch.equal(saved[k], weights[k]) for k in weights)
    # the comparison can tell the dtypes apart: bf16 Newton-Schulz alone changes the trajectory
    bf16 = train(TrainConfig(**RUN, dtype="bfloat16", output_dir=str(tmp_path / "bf16")))
    assert bf16["losses"][1:] != losses[1:]


# --- --dtype: how auto decides, what is recorded, what resume reuses

def force_cpu_bf16(monkeypatch, speedup):
    """Pretend this CPU has native bf16 and that a bf16 matmul measured `speedup` x fp32."""
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: ["avx512_bf16"])
    monkeypatch.setattr(precision, "bf16_matmul_speedup", lambda device: speedup)
    monkeypatch.setattr(precision.platform, "system", lambda: "Linux")


def test_auto_rules(monkeypatch):
    force_cpu_bf16(monkeypatch, 3.0)
    assert precision.resolve_dtype("auto", "cpu")[0] == "bfloat16"
    force_cpu_bf16(monkeypatch, 0.5)  # avx512_bf16 without AMX: bf16 GEMMs no faster than fp32
    dtype, why = precision.resolve_dtype("auto", "cpu")
    assert dtype == "float32" and "0.50x" in why and "avx512_bf16" in why
    monkeypatch.setattr(precision, "cpu_bf16_features", lambda: [])
    monkeypatch.setattr(precision, "bf16_matmul_speedup", lambda device: pytest.fail("no native bf16: nothing to time"))
    assert precision.resolve_dtype("auto", "cpu")[0] == "float32"
    assert precision.resolve_dtype("bfloat16", "cpu") == ("bfloat16", "--dtype")
    assert precision.resolve_dtype("auto", "mps")[0] == "float32"
    force_cpu_bf16(monkeypatch, 3.0)
    monkeypatch.setattr(precision.platform, "system", lambda: "Darwin")
    assert precision.resolve_dtype("auto", "cpu")[0] == "float32"


def test_resume_keeps_the_checkpoint_dtype(monkeypatch):
    force_cpu_bf16(monkeypatch, 3.0)
    assert precision.resolve_dtype("auto", "cpu", {"dtype": "float32"})[0] == "float32"
    assert precision.resolve_dtype("float32", "cpu", {"dtype": "float32"})[0] == "float32"
    # checkpoints from before --dtype: bf16 autocast on CUDA, fp32 elsewhere
    assert precision.resolve_dtype("auto", "cpu", {})[0] == "float32"
    assert precision.resolve_dtype("auto", "cuda", {})[0] == "bfloat16"
    with pytest.raises(UserError, match="--dtype=float32 or auto"):
        precision.resolve_dtype("bfloat16", "cpu", {"dtype": "float32"})


def test_real_cpu_auto_is_one_of_the_two():
    dtype, why = precision.resolve_dtype("auto", "cpu")
    assert dtype in ("float32", "bfloat16") and why.startswith("auto: ")



def test_auto_dtype_is_recorded_and_resume_reuses_it(base, tmp_path, monkeypatch, capsys):
    run = dict(RUN, num_iterations=4)
    force_cpu_bf16(monkeypatch, 3.0)
    full = train(TrainConfig(**run, output_dir=str(tmp_path / "a")))
    assert "Matmul dtype: bfloat16 (auto: CPU has avx512_bf16" in capsys.readouterr().out
    fp32 = train(TrainConfig(**run, dtype="float32", output_dir=str(tmp_path / "c")))
    assert fp32["losses"][1:] != full["losses"][1:]  # the two dtypes are distinguishable
    first = train(TrainConfig(**run, output_dir=str(tmp_path / "b")), hook=StopAt(2))
    config = json.loads((tmp_path / "b/base_checkpoints/d2/config.json").read_text())
    assert config["train_config"]["dtype"] == "bfloat16"
    ckpt = torch.load(tmp_path / "b/base_checkpoints/d2" / CHECKPOINT_NAME, map_location="cpu")
    assert ckpt["metadata"]["train_config"]["dtype"] == "bfloat16"
    force_cpu_bf16(monkeypatch, 0.5)  # a fresh decision would now be fp32
    capsys.readouterr()
    rest = train(TrainConfig(**run, resume=True, output_dir=str(tmp_path / "b")))
    assert "Matmul dtype: bfloat16 (kept from the checkpoint on --resume)" in capsys.readouterr().out
    assert first["losses"] + rest["losses"] == full["losses"]
    with pytest.raises(UserError, match="trained with --dtype=bfloat16, not float32"):
        train(TrainConfig(**run, resume=True, dtype="float32", output_dir=str(tmp_path / "b")))


def test_bad_dtype_flag_is_one_line(base, cli):
    code, _, err = cli("scripts.base_train", "--dtype=fp16", "--device_type=cpu")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "--dtype=fp16 is not valid: use auto, float32 or bfloat16" in err


# --- bf16 numerics against fp32

def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_bf16_and_fp32_losses_and_gradients_agree_on_a_fixed_batch():
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(2, 4096, 64))
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():  # the zero-initialised projections would make the loss exactly ln(V)
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0.0, 0.05)
    idx, tgt = torch.randint(0, 4096, (2, 64)), torch.randint(0, 4096, (2, 64))
    tgt[0, :3] = -1
    results = {}
    for dtype in ("float32", "bfloat16"):
        with precision.autocast_for("cpu", dtype):
            loss = model(idx, tgt)
            per_token = model(idx, tgt, loss_reduction="none")
        loss.backward()
        results[dtype] = loss.detach(), per_token, {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
    (l32, tok32, g32), (l16, tok16, g16) = results["float32"], results["bfloat16"]
    assert l16 != l32 and abs(l16 - l32) / l32 < 2e-3
    assert rel(tok16, tok32) < 1e-2
    for name in g32:
        assert g16[name].dtype == torch.float32  # master weights and their gradients stay fp32
        assert rel(g16[name], g32[name]) < 5e-2, name


@pytest.mark.parametrize("scale", [0.3, 3.0])  # ordinary and saturated soft-cap
def test_fused_cross_entropy_bf16_gradient_matches_fp32_autograd(scale):
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    w = (torch.randn(1000, 32) * scale).requires_grad_(True)
    t = torch.randint(0, 1000, (64,))
    t[[3, 10]] = -1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = SoftcapCrossEntropyMean.apply(x, w, t)
    (2.5 * loss).backward()
    gx, gw = x.grad, w.grad
    x.grad = w.grad = None
    ref = F.cross_entropy(SOFTCAP * torch.tanh(x @ w.T / SOFTCAP), t, ignore_index=-1)
    (2.5 * ref).backward()
    assert loss.dtype == gx.dtype == gw.dtype == torch.float32
    assert loss != ref and abs(loss - ref) / ref < 2e-3
    assert 0 < rel(gx, x.grad) < 1e-2 and 0 < rel(gw, w.grad) < 1e-2


def test_newton_schulz_bf16_matches_fp32():
    torch.manual_seed(0)
    for shape in [(64, 64), (32, 128), (128, 32), (3, 64, 256)]:
        G = torch.randn(*shape)
        X32 = zeropower_via_newtonschulz5(G, dtype=torch.float32)
        X16 = zeropower_via_newtonschulz5(G, dtype=torch.bfloat16)
        assert X16.dtype == torch.bfloat16 and X32.dtype == torch.float32
        assert 0 < rel(X16, X32) < 3e-2


def test_muon_uses_its_newton_schulz_dtype():
    torch.manual_seed(0)
    params = {dt: torch.nn.Parameter(torch.ones(32, 16)) for dt in (torch.float32, torch.bfloat16)}
    grad = torch.randn(32, 16)
    for dt, p in params.items():
        p.grad = grad.clone()
        Muon([("p", p)], lr=0.1, ns_dtype=dt).step()
        assert p.dtype == torch.float32
    d32, d16 = params[torch.float32] - 1, params[torch.bfloat16] - 1
    assert 0 < rel(d16, d32) < 3e-2


def rows(losses, bpb):
    """train_metrics.jsonl rows of a run: a loss per step, the val bpb at the last."""
    out = [{"step": s, "loss": loss} for s, loss in enumerate(losses, 1)]
    out[-1]["val_bpb"] = bpb
    return out


def test_compare_dtypes_measures_the_drift_after_the_first_steps(tmp_path, capsys):
    """scripts.compare_dtypes on two finished runs' files (reused, nothing is trained): the loss drift after --after
    and the final val bpb drift, read from train_metrics.jsonl, against the limits."""
    from scripts.compare_dtypes import main
    fp32 = [10.0] * 20
    bf16 = [12.0] * 10 + [10.0] * 9 + [10.3]  # far off early (ignored), 3% off at step 20
    flags = ["--depth=2", "--num_iterations=20"]
    for dtype, losses, bpb in (("float32", fp32, 2.0), ("bfloat16", bf16, 2.01)):
        run_dir = tmp_path / "base_checkpoints" / dtype
        write_command(str(run_dir), [*flags, f"--dtype={dtype}", f"--model_tag={dtype}", f"--output_dir={tmp_path}"])
        (run_dir / "config.json").write_text(json.dumps({"step": 20, "num_iterations": 20}))
        (run_dir / CHECKPOINT_NAME).write_bytes(b"")
        (run_dir / "train_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(losses, bpb)))
    main([f"--out={tmp_path}", "--max_loss_diff=0.05", "--", *flags])
    out = capsys.readouterr().out
    assert "reusing float32" in out and "reusing bfloat16" in out
    assert "loss after step 10: largest |bf16 - fp32| / fp32 = 3.0000% at step 20 (limit 5.00%): PASS" in out
    assert "final val bpb: fp32 2.0000, bf16 2.0100, difference 0.5000% (limit 1.00%): PASS" in out
    with pytest.raises(SystemExit) as stop:  # the default limit, 2%
        main([f"--out={tmp_path}", "--after=5", "--", *flags])
    out = capsys.readouterr().out
    assert stop.value.code == 1 and "= 20.0000% at step 6 (limit 2.00%): FAIL" in out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_compiled_cpu_forward_matches_eager(dtype):
    """On CPU the compiled forward keeps the fused loss (eager, a graph break): same loss and gradients."""
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(2, 1024, 64))
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0.0, 0.05)
    idx, tgt = torch.randint(0, 1024, (2, 64)), torch.randint(0, 1024, (2, 64))
    grads = []
    for forward in (model, torch.compile(model, dynamic=False)):
        with precision.autocast_for("cpu", dtype):
            loss = forward(idx, tgt)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
        model.zero_grad(set_to_none=True)
    (l_eager, g_eager), (l_comp, g_comp) = grads
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert abs(l_comp - l_eager) / l_eager < tol
    for name in g_eager:
        assert rel(g_comp[name], g_eager[name]) < tol, name
