"""scripts/gpu_check.py at toy sizes on CPU, so the GPU check job cannot rot: every check runs and passes,
and a failing check makes the script exit non-zero."""

import json
import os
import subprocess
import sys

import pytest

from nanochat.gpt import AdaptiveSVDLinear
from scripts import gpu_check
from tests.conftest import ROOT


@pytest.mark.slow
def test_tiny_gpu_check_runs_every_check_on_cpu(base, tmp_path):
    r = subprocess.run([sys.executable, "-m", "scripts.gpu_check", "--tiny=true", "--device_type=cpu", f"--out={tmp_path}"],
                       cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(next(line for line in r.stdout.splitlines() if line.startswith("GPU CHECK "))[len("GPU CHECK "):])
    checks = [row["check"] for row in result["rows"]]
    assert result["passed"] and checks == ["phase1", "svd 256x256", "svd 1024x256", "d20 baseline", "d20 adaptive",
                                           "bf16 protected"]
    assert "| phase1" in r.stdout and "recompiles vs baseline 0" in r.stdout
    assert os.path.exists(tmp_path / "phase1" / "base_checkpoints" / "d4" / "checkpoint.pt")


def test_a_failing_check_exits_non_zero(monkeypatch, capsys):
    """Protection that leaks (no projection at all) must fail the bf16 check and the script."""
    monkeypatch.setattr(AdaptiveSVDLinear, "project", lambda self, X: X.float())
    with pytest.raises(SystemExit) as stop:
        gpu_check.main(["--tiny=true", "--device_type=cpu", "--only=bf16"])
    assert stop.value.code == 1
    out = capsys.readouterr().out
    assert "| bf16 protected | NO" in out and '"passed": false' in out


def test_bf16_check_passes_with_the_real_projection(capsys):
    gpu_check.main(["--tiny=true", "--device_type=cpu", "--only=bf16"])
    assert "| bf16 protected | yes" in capsys.readouterr().out
