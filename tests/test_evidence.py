"""Evidence tooling: the Phase 2 runner on tiny real runs (d2, seq 64), its tables checked against an independent
reading of the runs' JSONL files and rebuilt from the kept files alone; the statistics on known numbers (t-table
values, scipy) and by simulation (coverage); figures, the monitor, and reusing and continuing runs. The forgetting
runner: tests/test_forgetting.py."""

import gzip
import json
import math
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from unittest import mock

import numpy as np
import pytest
import scipy.stats
import torch

from nanochat import stats
from nanochat.checkpoint_manager import load_checkpoint
from nanochat.common import UserError
from nanochat.jobs import Job
from nanochat.plots import forgetting_figures, make_figures
from nanochat.runs import Follower, finished, read_jsonl, run_settings, step_rows, summarize
from scripts import compare_runs, monitor_svd, plot_svd
from tests.conftest import ROOT

TINY = ["--depth=2", "--max_seq_len=64", "--device_batch_size=1", "--total_batch_size=64", "--eval_tokens=640",
        "--sample_every=-1", "--device_type=cpu", "--dtype=float32"]  # runs compared here must not each time bf16 against fp32 (--dtype=auto) on their own
PNG = b"\x89PNG\r\n\x1a\n"


def jsonl(path):
    """An independent reading of a metrics file: every line, parsed."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def scipy_interval(values):
    n = len(values)
    mean, sd = statistics.mean(values), statistics.stdev(values)
    return mean, sd, scipy.stats.t.interval(0.95, n - 1, loc=mean, scale=sd / math.sqrt(n))


# ------------------------------------------------------------------------------------------------ statistics

def test_t_interval_takes_the_t_table_quantile_and_covers_the_mean_as_often_as_its_level():
    # t((1 + level) / 2, n - 1) as printed in any t table, for n values 0, 1, ..., n-1
    for n, level, t in ((2, 0.95, 12.7062), (3, 0.95, 4.3027), (6, 0.99, 4.0321), (11, 0.90, 1.8125), (31, 0.95, 2.0423)):
        iv = stats.t_interval([float(i) for i in range(n)], level)
        assert iv["t"] == pytest.approx(t, abs=1e-4), (n, level)
        assert (iv["lo"], iv["hi"]) == pytest.approx((iv["mean"] - t * iv["sd"] / math.sqrt(n),
                                                      iv["mean"] + t * iv["sd"] / math.sqrt(n)), rel=1e-4)
    # 4000 samples of three normal values: the 95% interval holds the true mean about 95% of the time
    # (the normal quantile 1.96 in place of t would cover only about 81%)
    samples = np.random.default_rng(0).normal(1.0, 2.0, size=(4000, 3))
    intervals = [stats.t_interval(list(s)) for s in samples]
    assert np.mean([iv["lo"] <= 1.0 <= iv["hi"] for iv in intervals]) == pytest.approx(0.95, abs=0.015)
    for bad in (0.0, 1.0, 95):
        with pytest.raises(ValueError, match="level must lie in"):
            stats.t_interval([1.0, 2.0], bad)


def test_interval_arithmetic_on_known_numbers():
    # 1, 2, 3, 4: mean 2.5, sample sd sqrt(5/3); t(0.975, 3) = 3.1824 (any t table)
    iv = stats.t_interval([1.0, 2.0, 3.0, 4.0])
    half = 3.1824463 * math.sqrt(5 / 3) / 2
    assert iv["n"] == 4 and iv["mean"] == 2.5 and iv["sd"] == pytest.approx(math.sqrt(5 / 3))
    assert iv["t"] == pytest.approx(3.1824463, rel=1e-7)
    assert (iv["lo"], iv["hi"]) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-7)
    # three seeds, as in the experiments: t(0.975, 2) = 4.3027; paired differences -0.2, -0.25, -0.23
    seeds, diffs = stats.paired({42: 0.3, 43: 0.35, 44: 0.32, 45: 9.0}, {42: 0.5, 43: 0.6, 44: 0.55})
    assert seeds == [42, 43, 44] and diffs == pytest.approx([-0.2, -0.25, -0.23])
    iv = stats.t_interval(diffs)
    mean, sd, (lo, hi) = scipy_interval(diffs)
    assert (iv["mean"], iv["sd"], iv["lo"], iv["hi"]) == pytest.approx((mean, sd, lo, hi), rel=1e-9)
    assert iv["hi"] == pytest.approx(-0.22667 + 4.3026527 * 0.0251661 / math.sqrt(3), abs=1e-4)
    assert stats.excludes(iv, 0.0) is True and stats.excludes(stats.t_interval([-1.0, 1.0]), 0.0) is False
    # one value: a mean, no spread, no interval; never a NaN
    assert stats.t_interval([5.0]) == {"n": 1, "mean": 5.0, "sd": None, "lo": None, "hi": None, "t": None}
    assert stats.excludes(stats.t_interval([5.0]), 0.0) is None and stats.mean_std([]) == (None, None)
    with pytest.raises(ValueError, match="non-finite"):
        stats.mean_std([1.0, float("nan")])


# ------------------------------------------------------------------------------------------------ Phase 2 runner

@pytest.fixture(scope="module")
def comparison(prepared_base, tmp_path_factory):
    """Two seeds of baseline + adaptive through the runner's CLI, two runs at a time, shared by the checks below."""
    mp = pytest.MonkeyPatch()
    mp.setenv("NANOCHAT_BASE_DIR", str(prepared_base))
    mp.setenv("WANDB_MODE", "disabled")
    out = tmp_path_factory.mktemp("cmp")
    argv = [f"--out={out}", "--seeds=42,43", "--jobs=2", "--figures=false", "--", *TINY, "--adaptive_svd_target_layer=-1",
            "--svd_targets=attn", "--svd_interval=3", "--num_iterations=9", "--eval_every=3",
            "--svd_protect_frac=0.1", "--svd_alpha=0.9", "--svd_exit_p=0.95", "--svd_patience=1"]  # layers switch
    compare_runs.main(argv)
    yield out, argv
    mp.undo()


def independent_run(run_dir):
    rows = jsonl(os.path.join(run_dir, "train_metrics.jsonl"))
    dts = [r["dt"] for r in rows if "dt" in r]
    vals = [r["val_bpb"] for r in rows if "val_bpb" in r]
    svd_path = os.path.join(run_dir, "svd_metrics.jsonl")
    recs = [r for r in jsonl(svd_path) if "mode_after" in r] if os.path.exists(svd_path) else []
    analysis = sum({r["step"]: r["analysis_seconds"] for r in recs}.values())
    out = {"final_val_bpb": vals[-1], "min_val_bpb": min(vals), "loop_s": sum(dts), "median_step_s": statistics.median(dts),
           "analysis_s": analysis, "time_estimate_s": len(dts) * statistics.median(dts) + analysis}
    if recs:
        out.update(lowrank_share=sum(r["mode_after"] == "lowrank" for r in recs) / len(recs),
                   to_lowrank=sum(r["action"] == "to_lowrank" for r in recs), to_full=sum(r["action"] == "to_full" for r in recs),
                   mean_k=sum(r["k"] for r in recs) / len(recs))
    return out


@pytest.mark.slow  # in CI's slow pass: keeps the default suite under 2 minutes
def test_comparison_tables_match_an_independent_reading(comparison):
    out, argv = comparison
    runs = out / "base_checkpoints"
    for tag in ("baseline_s42", "adaptive_s42", "baseline_s43", "adaptive_s43"):
        for name in ("train.log", "command.txt", "config.json", "checkpoint.pt", "train_metrics.jsonl"):
            assert (runs / tag / name).exists(), (tag, name)
    assert not (runs / "baseline_s42" / "svd_metrics.jsonl").exists()
    cmd = {t: (runs / t / "command.txt").read_text().split() for t in ("baseline_s42", "adaptive_s42")}
    strip = lambda c: [a for a in c if not a.startswith(("--adaptive_svd=", "--model_tag="))]
    assert strip(cmd["baseline_s42"]) == strip(cmd["adaptive_s42"])  # same seed, data, tokens, hyperparameters
    assert "--seed=42" in cmd["baseline_s42"] and "--data_seed=42" in cmd["baseline_s42"]  # init and data order by seed
    # every run kept: the reports' only source
    for tag in ("baseline_s42", "adaptive_s42", "baseline_s43", "adaptive_s43"):
        kept, run = out / "kept" / tag, runs / tag
        names = set(os.listdir(kept))
        assert names - {"svd_metrics.jsonl.gz"} == {"config.json", "command.txt", "provenance.json", "data_position.json",
                                                     "train_metrics.jsonl.gz"}
        assert ("svd_metrics.jsonl.gz" in names) == tag.startswith("adaptive")
        for name in names - {"data_position.json", "provenance.json"}:  # the run's own files, gzipped ones unchanged
            plain = name[:-3] if name.endswith(".gz") else name
            got = gzip.decompress((kept / name).read_bytes()) if name.endswith(".gz") else (kept / name).read_bytes()
            assert got == (run / plain).read_bytes(), (tag, name)
        assert json.loads((kept / "data_position.json").read_text()) == load_checkpoint(str(run / "checkpoint.pt"))["loop"]["dataloader"]
        (entry,) = json.loads((kept / "provenance.json").read_text())
        assert entry["mode"] == "fresh" and entry["threads"] == 1 and entry["torch"] == torch.__version__
        assert entry["git_commit"] == subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                                                     text=True).stdout.strip() and isinstance(entry["git_dirty"], bool)
        assert entry["wall_s"] > 0 and entry["cpu"]
    data = json.loads((out / "comparison.json").read_text())
    assert data["run_commands"] == [(runs / t / "command.txt").read_text().strip()
                                    for t in ("baseline_s42", "adaptive_s42", "baseline_s43", "adaptive_s43")]
    # what the runs were made with, in the report: one dtype, and the four starts' commit, torch and machine
    assert data["dtypes"] == ["float32"] and sum(p["starts"] for p in data["provenance"]) == 4
    assert {(p["git_commit"], p["torch"], p["cpu"]) for p in data["provenance"]} == {(entry["git_commit"], entry["torch"],
                                                                                     entry["cpu"])}
    for result in data["results"]:
        for kind in ("baseline", "adaptive"):
            run_dir = str(runs / f"{kind}_s{result['seed']}")
            expect, got = independent_run(run_dir), result["runs"][kind]
            for key, value in expect.items():
                if key in got:
                    assert got[key] == pytest.approx(value, rel=1e-12), (kind, key)
                else:
                    assert got["svd"][key] == pytest.approx(value, rel=1e-12), (kind, key)
            assert got["final_val_bpb"] == json.loads(open(os.path.join(run_dir, "config.json")).read())["val_bpb"]
            assert got["steps"] == 9 and got["tokens"] == 9 * 64
        b, a = (independent_run(str(runs / f"{k}_s{result['seed']}")) for k in ("baseline", "adaptive"))
        assert result["bpb_ratio"] == pytest.approx(a["final_val_bpb"] / b["final_val_bpb"])
        assert result["median_step_ratio"] == pytest.approx(a["median_step_s"] / b["median_step_s"])
        assert result["time_estimate_ratio"] == pytest.approx(a["time_estimate_s"] / b["time_estimate_s"])
        assert result["to_lowrank"] == a["to_lowrank"] > 0 and result["equal_tokens"] is True
    ratios = [r["bpb_ratio"] for r in data["results"]]
    mean, sd, (lo, hi) = scipy_interval(ratios)
    iv = data["summary"]["bpb ratio adaptive/baseline"]
    assert (iv["mean"], iv["sd"], iv["lo"], iv["hi"]) == pytest.approx((mean, sd, lo, hi), rel=1e-9)
    met = bool(hi <= 1.005)  # judged by the interval's upper bound
    assert data["summary"]["target"] == {"upper_bound": pytest.approx(hi, rel=1e-9), "met": met}
    md = (out / "comparison.md").read_text()
    assert (f"Research target (the upper bound of the bpb ratio's 95% interval at most 1.005): "
            f"{'**met**' if met else '**not met**'}. Mean bpb ratio {mean:.4f}, 95% interval [{lo:.4f}, {hi:.4f}]: upper bound "
            f"{hi:.4f} {'<=' if met else '>'} 1.005.") in md
    assert f"| bpb ratio adaptive/baseline | {mean:.4f} ± {sd:.4f} | [{lo:.4f}, {hi:.4f}] |" in md
    b42 = data["results"][0]["runs"]["baseline"]
    assert f"| baseline_s42 | 9 | 576 | {b42['final_val_bpb']:.4f} |" in md


@pytest.mark.slow  # in CI's slow pass: keeps the default suite under 2 minutes
def test_comparison_reuses_finished_runs_and_refuses_another_command(comparison, tmp_path, capsys):
    out, argv = comparison
    runs = out / "base_checkpoints"
    mtime = os.path.getmtime(runs / "adaptive_s42" / "train.log")
    compare_runs.main(argv)
    assert os.path.getmtime(runs / "adaptive_s42" / "train.log") == mtime
    assert capsys.readouterr().out.count("reusing ") == 4
    # a run folder's state from its files: finished, stopped part-way (checkpoint, not at the end), another command
    copy = tmp_path / "adaptive_s42"
    shutil.copytree(runs / "adaptive_s42", copy)
    argv_run = shlex.split((copy / "command.txt").read_text())[3:]  # after python -m scripts.base_train_adaptive_svd
    job = Job("adaptive_s42", str(copy), argv_run, finished)
    assert job.state(force=False) == "done" and job.state(force=True) == "fresh"
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "step": 6}))
    assert job.state(force=False) == "resume"
    (copy / "checkpoint.pt").unlink()
    assert job.state(force=False) == "fresh"
    (copy / "command.txt").write_text("python -m scripts.base_train_adaptive_svd --depth=3\n")
    with pytest.raises(UserError, match="holds a run of another command"):
        job.state(force=False)
    with pytest.raises(UserError, match="no kept run for baseline_s42"):
        compare_runs.main([f"--out={tmp_path / 'empty'}", "--table_only=true", "--seeds=42", "--", *TINY])
    with pytest.raises(UserError, match="--seed is set by the comparison runner itself"):
        compare_runs.main([f"--out={tmp_path}", "--", *TINY, "--seed=1"])
    # one matmul dtype for every run: float32 unless the flags give one; auto (each run choosing) is refused
    no_dtype = [a for a in TINY if not a.startswith("--dtype")]
    with pytest.raises(UserError, match="--dtype=auto lets each run of the comparison choose its own matmul dtype"):
        compare_runs.main([f"--out={tmp_path / 'auto'}", "--", *no_dtype, "--dtype=auto"])
    assert not (tmp_path / "auto").exists()
    planned = []

    def plan_only(jobs, *args, **kwargs):
        planned.extend(jobs)
        raise UserError("planned")

    for given, expect in ((no_dtype, "float32"), (no_dtype + ["--dtype=bfloat16"], "bfloat16")):
        planned.clear()
        with mock.patch.object(compare_runs, "run_jobs", plan_only), pytest.raises(UserError, match="planned"):
            compare_runs.main([f"--out={tmp_path / 'plan'}", "--seeds=42,43", "--figures=false", "--", *given])
        assert len(planned) == 4 and all([a for a in job.argv if a.startswith("--dtype")] == [f"--dtype={expect}"]
                                         for job in planned)


@pytest.mark.slow  # in CI's slow pass: keeps the default suite under 2 minutes
def test_rebuild_from_the_kept_files_alone_reproduces_the_report_byte_for_byte(comparison, tmp_path, cli):
    """An experiment folder holding only what the runner kept (no run folder, no checkpoint): the rebuild writes
    comparison.json and .md byte for byte as the runner did, and --check fails when a kept number changes."""
    out, _ = comparison
    exp = tmp_path / "runs" / "p2"
    shutil.copytree(out / "kept", exp / "kept")
    for name in ("comparison.json", "comparison.md"):
        shutil.copy(out / name, exp)
    code, stdout, err = cli("scripts.rebuild_evidence", f"--runs={tmp_path / 'runs'}", "--check=true", "--figures=false")
    assert code == 0 and stdout.count("same: ") == 2, err
    code, stdout, _ = cli("scripts.rebuild_evidence", f"--runs={tmp_path / 'runs'}", f"--out={tmp_path / 'rebuilt'}")
    assert code == 0
    for name in ("comparison.json", "comparison.md"):
        assert (tmp_path / "rebuilt/p2" / name).read_bytes() == (out / name).read_bytes()
    assert {p.name for p in (tmp_path / "rebuilt/p2").glob("*.png")} == {
        f"p2_s42_{n}.png" for n in ("loss_bpb", "mode_rank", "alignment_ratio", "alignment_p", "principal_alignment",
                                     "subspace")}
    # a kept number changes: the rebuilt table is no longer the kept one, and --check says which
    metrics = exp / "kept" / "baseline_s43" / "train_metrics.jsonl.gz"
    rows = gzip.decompress(metrics.read_bytes()).decode().splitlines(True)
    last = json.loads(rows[-1])
    rows[-1] = json.dumps({**last, "val_bpb": last["val_bpb"] + 0.01}) + "\n"
    metrics.write_bytes(gzip.compress("".join(rows).encode()))
    code, stdout, err = cli("scripts.rebuild_evidence", f"--runs={tmp_path / 'runs'}", "--check=true", "--figures=false")
    assert code == 1 and "DIFFERS: " in stdout and err.startswith("error: 2 rebuilt table(s) differ") and err.count("\n") == 1


@pytest.mark.slow  # in CI's slow pass: keeps the default suite under 2 minutes
def test_figures_from_the_per_step_file_and_a_running_run_and_none_without_it(comparison, tmp_path):
    out, _ = comparison
    runs = out / "base_checkpoints"
    adaptive = runs / "adaptive_s42"
    written = make_figures(str(adaptive), str(tmp_path / "f"), baseline=str(runs / "baseline_s42"))
    names = {os.path.basename(p) for p in written}
    assert names == {"loss_bpb.png", "mode_rank.png", "alignment_ratio.png", "alignment_p.png", "principal_alignment.png",
                     "subspace.png"}
    for p in written:
        assert open(p, "rb").read(8) == PNG and 5_000 < os.path.getsize(p) < 2_000_000
    # a run still in progress: no config.json or checkpoint yet, torn last lines in both metrics files
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(adaptive / "command.txt", live)
    for name, keep in (("svd_metrics.jsonl", 9), ("train_metrics.jsonl", 5)):
        lines = (adaptive / name).read_text().splitlines(True)
        (live / name).write_text("".join(lines[:keep]) + lines[keep][:30])
    assert len(read_jsonl(str(live / "svd_metrics.jsonl"))) == 9 and len(step_rows(str(live))) == 5
    assert {os.path.basename(p) for p in make_figures(str(live), str(tmp_path / "g"))} == names
    # a folder without train_metrics.jsonl (its console log is for people, never read): one line naming the file
    no_rows = tmp_path / "no_rows"
    no_rows.mkdir()
    for name in ("svd_metrics.jsonl", "config.json", "train.log"):
        shutil.copy(adaptive / name, no_rows)
    missing = f"{no_rows / 'train_metrics.jsonl'} does not exist"
    for read in (step_rows, summarize, lambda d: make_figures(d, str(tmp_path / "h")),
                 lambda d: plot_svd.main([d, f"--out={tmp_path / 'h'}"])):
        with pytest.raises(UserError, match=re.escape(missing)) as e:
            read(str(no_rows))
        assert "\n" not in str(e.value)
    assert not (tmp_path / "h").exists()


def test_without_matplotlib_figures_fail_in_one_line_before_anything_runs(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when it is not installed
    for draw in (lambda: make_figures(str(tmp_path / "run"), str(tmp_path / "figs")),
                 lambda: forgetting_figures({}, str(tmp_path / "figs")),
                 lambda: compare_runs.main([f"--out={tmp_path / 'p2'}", "--seeds=42", "--", *TINY])):
        with pytest.raises(UserError, match=r"^matplotlib is not installed; install the plots extra") as e:
            draw()
        assert "\n" not in str(e.value)
    assert not (tmp_path / "p2").exists() and not (tmp_path / "figs").exists()  # stopped before its runs, no folder made


# ------------------------------------------------------------------------------------------------ monitor

def test_monitor_follows_growing_files(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    # thresholds come from the run's config, here deliberately not the defaults
    (run / "config.json").write_text(json.dumps({"train_config": {"svd_policy": "adaptive", "svd_alpha": 1e-4,
                                                                  "svd_exit_p": 0.2, "svd_overlap_stable": 0.5,
                                                                  "svd_stable_rule": False}}))
    path = run / "svd_metrics.jsonl"

    def rec(step, **kw):
        r = {"step": step, "layer": "block0.attn.c_q", "mode": "full", "shape": [8, 8], "action": "keep",
             "reason": "continue_current_mode", "mode_after": "full", "r_after": 8, "k": 2,
             "alignment_ratio": 1.0, "alignment_p": 0.5, "update_alignment_ratio": 1.0,
             "subspace_overlap_above_chance": 0.9}
        r.update(kw)
        return json.dumps(r) + "\n"

    def monitor():
        """The lines `monitor_svd RUN --once` prints now, after its thresholds line (it reads the files from the start)."""
        monitor_svd.main([str(run), "--once"])
        out = capsys.readouterr().out.splitlines()
        assert out[0].startswith(f"thresholds from {run / 'config.json'}: ") and "svd_alpha=0.0001" in out[0]
        return out[1:]

    assert monitor() == []  # nothing written yet
    path.write_text(rec(10, alignment_p=5e-4))  # below the default 1e-3, above this run's 1e-4
    assert monitor() == ["--- analysis at step 10"]  # and the stable rule (overlap 0.9 >= 0.5) is off in this run
    full = rec(20, alignment_p=1e-5, action="to_lowrank", reason="gradient_clobbering_risk", mode_after="lowrank",
               r_after=6)
    with open(path, "a") as f:
        f.write(full[:30])  # half a line: not read yet
    assert monitor() == ["--- analysis at step 10"]
    with open(path, "a") as f:
        f.write(full[30:])
    events = monitor()
    assert any("SWITCH full -> lowrank" in e and "gradient_clobbering_risk" in e for e in events)
    assert any("alignment_p=1e-05 crossed svd_alpha=0.0001 -> gradient_clobbering_risk" in e for e in events)
    with open(path, "a") as f:
        f.write(rec(30, mode="lowrank", mode_after="lowrank", r_after=4, alignment_p=0.3))
    events = monitor()
    assert any("r 6 -> 4" in e for e in events)
    # the first low-rank analysis is already on the exit side of this run's 0.2: reported once
    assert sum("alignment_p=0.3 crossed svd_exit_p=0.2 -> clobbering_risk_passed" in e for e in events) == 1
    path.write_text(rec(5))  # a new run replaced the file
    (run / "train_metrics.jsonl").write_text(json.dumps({"step": 4, "loss": 3.0}) + "\n" +
                                             json.dumps({"step": 5, "loss": 2.9, "val_bpb": 1.25, "extra_val_bpb": 1.5}) + "\n")
    assert monitor() == ["step      5 evaluation: val bpb 1.2500 | extra val bpb 1.5000", "--- analysis at step 5"]


def test_follower_reads_complete_new_lines_and_starts_over_on_a_new_file(tmp_path):
    path = tmp_path / "svd_metrics.jsonl"
    follower = Follower(str(path))
    assert follower.new_records() == []  # not created yet
    path.write_text('{"step": 1}\n{"step": 2}\n{"st')
    assert follower.new_records() == [{"step": 1}, {"step": 2}]  # the torn last line waits for its end
    assert follower.new_records() == []
    with open(path, "a") as f:
        f.write('ep": 3}\n{"step": 4}\n')
    assert follower.new_records() == [{"step": 3}, {"step": 4}]
    path.write_text('{"step": 1}\n')  # a new run replaced the file
    assert follower.new_records() == [{"step": 1}]


@pytest.mark.slow  # in CI's slow pass: keeps the default suite under 2 minutes
def test_settings_from_command_txt_before_the_first_checkpoint(comparison, tmp_path, capsys):
    out, _ = comparison
    only_cmd = tmp_path / "only_cmd"
    only_cmd.mkdir()
    shutil.copy(out / "base_checkpoints" / "adaptive_s42" / "command.txt", only_cmd)
    settings, source = run_settings(str(only_cmd))
    assert source.endswith("command.txt") and settings["svd_targets"] == "attn" and settings["seed"] == 42
    monitor_svd.main([str(only_cmd), "--once"])
    out = capsys.readouterr().out  # the run's own threshold, not the default
    assert out.startswith(f"thresholds from {only_cmd / 'command.txt'}: ") and "svd_alpha=0.9" in out


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_to_the_runner_reaches_its_runs_which_save_and_continue(base, tmp_path, signum):
    """SIGTERM to the runner alone (e.g. `kill PID`), or SIGUSR1 (SLURM's warning before the time limit, to a
    runner that a job started with SIGUSR1 ignored): it passes the signal on, each running run saves its last step,
    the runner stops in one line with status 128 + the signal, and the same command continues both runs exactly
    where they were."""
    out = tmp_path / "p2"
    argv = [sys.executable, "-m", "scripts.compare_runs", f"--out={out}", "--seeds=42", "--jobs=2", "--figures=false", "--",
            *TINY, "--num_iterations=300", "--eval_every=-1", "--svd_targets=attn", "--svd_interval=50"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ignore_usr1 = lambda: signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # as slurm/common.sh's nanochat_launch starts it
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=ignore_usr1)
    metrics = [out / "base_checkpoints" / t / "train_metrics.jsonl" for t in ("baseline_s42", "adaptive_s42")]
    deadline = time.time() + 300
    while time.time() < deadline and not all(m.exists() and len(m.read_text().splitlines()) >= 20 for m in metrics):
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum and err == (f"error: stopped by signal {int(signum)}; the runs saved what they "
                                                       f"had: run the same command again to continue\n")
    for m in metrics:
        saved = json.loads((m.parent / "config.json").read_text())["step"]
        assert 20 <= saved < 300 and f"Stopped by signal {int(signum)}" in (m.parent / "train.log").read_text()
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "continuing baseline_s42" in r.stdout and "continuing adaptive_s42" in r.stdout
    for m in metrics:
        assert [row["step"] for row in jsonl(m) if "dt" in row] == list(range(1, 301))  # every step once
