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
    assert result["passed"] and checks == ["phase1", "svd 256x256", "svd 1024x256", "d20 baseline", "d20 adaptive, interval 2",
                                           "d20 analysis split", "d20 adaptive, interval 4", "d20 wall-clock ratio",
                                           "bf16 protected"]
    assert "| phase1" in r.stdout and "recompiles vs baseline 0" in r.stdout
    split = next(row for row in result["rows"] if row["check"] == "d20 analysis split")["details"]
    assert all(f"{stage} " in split for stage in gpu_check.STAGES + ("other",)) and "host syncs per analysis" in split
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


def test_the_ratio_row_fails_above_the_limit_at_the_longest_interval():
    ratios = {10: (1.04, 11, 40, [1.03, 1.05]), 20: (1.019, 21, 40, [1.01, 1.028])}
    assert gpu_check.ratio_row(ratios, tiny=False)["ok"]
    failing = gpu_check.ratio_row({10: (1.04, 11, 40, [1.04, 1.04]), 20: (1.021, 21, 40, [1.02, 1.022])}, tiny=False)
    assert not failing["ok"] and "rounds 1.020 1.022" in failing["details"]
    assert gpu_check.ratio_row({10: (1.5, 3, 8, [1.5]), 20: (1.3, 5, 8, [1.3])}, tiny=True)["ok"]  # toy sizes: no measurement


def test_the_ratio_covers_whole_intervals_after_the_first_analysis():
    base = {"dt": {s: 1.0 for s in range(1, 41)}}
    adaptive = {"dt": {s: 1.0 + (5.0 if s % 20 == 0 else 0.0) + (100.0 if s == 1 else 0.0) for s in range(1, 41)}}
    slow = {"dt": {s: 2.0 for s in range(1, 41)}}  # a second round on a slower spell of the machine
    # step 1 (compile) and 20 left out; the rounds pool
    assert gpu_check.wall_clock_ratio([adaptive], [base], 20, 40) == (25 / 20, 21, 40, [25 / 20])
    assert gpu_check.wall_clock_ratio([adaptive, slow], [base, slow], 20, 40) == (65 / 60, 21, 40, [25 / 20, 1.0])


def test_the_split_adds_up_from_the_records():
    def rec(step, layer, svd, metrics):
        return {"step": step, "layer": layer, "svd_seconds": svd, "metrics_seconds": metrics, "decision_seconds": 0.0,
                "analysis_seconds": 2.0 if step > 10 else 9.0, "exchange_seconds": 0.1, "apply_seconds": 0.2,
                "host_syncs": 30, "host_sync_seconds": 0.5}
    records = [rec(10, "a", 4.0, 1.0), rec(10, "b", 4.0, 1.0), rec(20, "a", 0.5, 0.25), rec(20, "b", 0.5, 0.25)]
    split = gpu_check.analysis_split(records)
    assert split["seconds"]["svd"] == 1.0 and split["seconds"]["metrics"] == 0.5 and split["seconds"]["total"] == 2.0
    assert abs(split["seconds"]["other"] - 0.2) < 1e-12 and split["first_s"] == 9.0
    assert (split["syncs"], split["matrices"]) == (30, 2)
