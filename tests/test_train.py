"""The shared training loop end to end on the real offline corpus: learning, checkpoints, exact resume, CLI errors."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from nanochat.checkpoint_manager import CHECKPOINT_NAME
from nanochat.gpt import GPT, GPTConfig
from nanochat.train import TrainConfig, train
from tests.conftest import ROOT, StopAt

TINY = dict(depth=2, max_seq_len=64, device_batch_size=2, total_batch_size=256, eval_tokens=1024,
            sample_every=-1, device_type="cpu", dtype="float32")  # runs compared here must not each time bf16 against fp32 (--dtype=auto) on their own


def test_training_lowers_validation_bpb(base, tmp_path, capsys):
    result = train(TrainConfig(**TINY, num_iterations=40, eval_every=40, output_dir=str(tmp_path)))
    out = capsys.readouterr().out
    bpbs = [float(line.split()[-1]) for line in out.splitlines() if "Validation bpb" in line]
    assert len(bpbs) == 2 and bpbs[1] < bpbs[0] - 0.3
    assert result["losses"][-1] < result["losses"][0] - 1.0
    for needed in ("Vocab size: 4,096", "num_layers: 2", "model_dim: 128", "num_heads: 1",
                   "Number of parameters:", "step 00001/00040 (2.50%) | loss:", "Peak memory usage:",
                   "Total training time:", "Minimum validation bpb:",
                   "Plan: 40 steps of 256 tokens to go (10,240 tokens), validation on 1,024 tokens every 40 steps and at the end",
                   "Estimated time for the remaining 35 steps: "):
        assert needed in out


def test_checkpoint_loads_strictly_into_plain_gpt(base, tmp_path):
    train(TrainConfig(**TINY, num_iterations=3, output_dir=str(tmp_path)), default_tag="d2_test")
    ckpt_dir = tmp_path / "base_checkpoints" / "d2_test"
    assert (ckpt_dir / "config.json").exists()
    ckpt = torch.load(ckpt_dir / CHECKPOINT_NAME, map_location="cpu")  # weights_only default
    model = GPT(GPTConfig(**ckpt["metadata"]["model_config"]))
    model.load_state_dict(ckpt["model"])  # strict
    assert not [f for f in os.listdir(ckpt_dir) if ".tmp" in f]



def test_signal_save_and_resume_is_exact(base, tmp_path):
    cfg = dict(TINY, num_iterations=8, eval_every=-1)
    full = train(TrainConfig(**cfg, output_dir=str(tmp_path / "a")))
    first = train(TrainConfig(**cfg, output_dir=str(tmp_path / "b")), hook=StopAt(4))
    assert first["stopped_by_signal"] == signal.SIGUSR1 and first["step"] == 4
    assert first["losses"] == full["losses"][:4]
    rest = train(TrainConfig(**cfg, output_dir=str(tmp_path / "b"), resume=True))
    assert rest["losses"] == full["losses"][4:]
    a = torch.load(tmp_path / "a/base_checkpoints/d2" / CHECKPOINT_NAME)["model"]
    b = torch.load(tmp_path / "b/base_checkpoints/d2" / CHECKPOINT_NAME)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def run_cli(args, env_base, cwd=ROOT):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(env_base))
    return subprocess.run([sys.executable, "-m", "scripts.base_train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args,expect", [
    (["--no_such_flag=1"], "unknown flag --no_such_flag"),
    (["--depht=4"], "did you mean --depth"),
    (["--depth=four"], "--depth expects int"),
    (["--depth=0"], "--depth=0 is out of range: use >= 1 or -1"),
    (["--device_type=tpu"], "--device_type=tpu is not valid: use "),
    (["--device_type=cuda"], "no CUDA device"),
    (["--device_type=cpu"], "--depth is required on cpu"),
    (["--depth=2", "--resume", "--overwrite"], "give one of them"),
    (["--depth=2", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=100", "--device_type=cpu"],
     "not a multiple of"),
])
def test_cli_errors_are_one_line(base, args, expect, cli):
    if "cuda" in str(args) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = cli("scripts.base_train", *args)
    assert code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert expect in err


@pytest.mark.parametrize("args", [[], ["--device_type=cpu"]])
def test_adaptive_script_without_a_model_size_on_cpu_asks_for_one(base, args, cli):
    if not args and (torch.cuda.is_available() or torch.backends.mps.is_available()):
        pytest.skip("autodetects an accelerator here")
    code, _, err = cli("scripts.base_train_adaptive_svd", *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--depth is required on cpu" in err, err


def test_missing_tokenizer_is_one_line(tmp_path):
    r = run_cli(["--depth=2", "--device_type=cpu"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "tokenizer" in r.stderr and "scripts.tok_train" in r.stderr


def test_corrupt_checkpoint_is_one_line_and_left_intact(base, tmp_path):
    ckpt_dir = tmp_path / "base_checkpoints" / "d2_baseline"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / CHECKPOINT_NAME).write_bytes(b"not a checkpoint")
    r = run_cli(["--depth=2", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=128",
                 "--device_type=cpu", "--resume", f"--output_dir={tmp_path}"], base)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "corrupt" in r.stderr
    assert (ckpt_dir / CHECKPOINT_NAME).read_bytes() == b"not a checkpoint"


def test_help_lists_flags(base, cli):
    code, out, _ = cli("scripts.base_train", "--help")
    assert code == 0 and "--num_iterations" in out and "--device_type" in out
