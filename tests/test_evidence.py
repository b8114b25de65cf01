"""Evidence tooling: comparison runner, plots, monitor, forgetting bookkeeping (tiny d2 runs, seq 64)."""

import json
import os
import shutil

import pytest

from nanochat.checkpoint_manager import load_checkpoint
from nanochat.dataset import offline_documents, write_shards
from scripts import compare_runs, forgetting, monitor_svd, plot_svd
from scripts.run_logs import parse_log, read_jsonl, run_settings

TINY = ["--depth=2", "--max_seq_len=64", "--device_batch_size=1", "--total_batch_size=64", "--eval_tokens=640",
        "--sample_every=-1", "--device_type=cpu", "--adaptive_svd_target_layer=-1", "--svd_targets=attn", "--svd_interval=3"]


@pytest.fixture(scope="module")
def comparison(prepared_base, tmp_path_factory):
    """One baseline + adaptive pair through the runner's CLI, shared by the checks below."""
    mp = pytest.MonkeyPatch()
    mp.setenv("NANOCHAT_BASE_DIR", str(prepared_base))
    mp.setenv("OMP_NUM_THREADS", "1")
    mp.setenv("WANDB_MODE", "disabled")
    out = tmp_path_factory.mktemp("cmp")
    compare_runs.main([f"--out={out}", "--", *TINY, "--num_iterations=12", "--eval_every=6"])
    yield out
    mp.undo()


def _independent_summary(records):
    recs = [r for r in records if "mode_after" in r]
    low = [r for r in recs if r["mode_after"] == "lowrank"]
    return {"lowrank_share": len(low) / len(recs), "to_lowrank": sum(r["action"] == "to_lowrank" for r in recs),
            "to_full": sum(r["action"] == "to_full" for r in recs),
            "mean_r": sum(r["r_after"] for r in low) / len(low) if low else None,
            "mean_k": sum(r["k"] for r in recs) / len(recs)}


def test_runner_files_table_and_values(comparison):
    runs = comparison / "base_checkpoints"
    for tag in ("baseline_s42", "adaptive_s42"):
        for name in ("train.log", "command.txt", "config.json", "checkpoint.pt", "wall_time.json"):
            assert (runs / tag / name).exists(), (tag, name)
    assert not (runs / "baseline_s42" / "svd_metrics.jsonl").exists()
    cmd = {t: (runs / t / "command.txt").read_text().split() for t in ("baseline_s42", "adaptive_s42")}
    strip = lambda c: [a for a in c if not a.startswith(("--adaptive_svd=", "--model_tag="))]
    assert strip(cmd["baseline_s42"]) == strip(cmd["adaptive_s42"])  # same seed, data, tokens, hyperparameters

    data = json.loads((comparison / "comparison.json").read_text())
    md = (comparison / "comparison.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| run |"))
    assert [c.strip() for c in header.strip("|").split("|")] == [c[1] for c in compare_runs.COLUMNS]
    rows = {r["run"]: r for r in data["rows"]}
    records = read_jsonl(str(runs / "adaptive_s42" / "svd_metrics.jsonl"))
    expect = _independent_summary(records)
    a, b = rows["adaptive_s42"], rows["baseline_s42"]
    for key, value in expect.items():
        assert a[key] == pytest.approx(value), key
    full = sum(r["shape"][0] * r["shape"][1] for r in records if r["step"] == records[0]["step"])
    assert b["full_params"] == full and b["lowrank_share"] == 0 and b["to_lowrank"] == 0
    for tag, row in rows.items():
        cfg = json.loads((runs / tag / "config.json").read_text())
        assert row["tokens"] == 12 * 64 and row["steps"] == 12
        assert row["final_val_bpb"] == pytest.approx(cfg["val_bpb"], abs=1e-4)
        assert row["min_val_bpb"] == pytest.approx(cfg["min_val_bpb"], abs=1e-4)
        assert row["peak_memory_mib"] > 0 and row["train_time_s"] is not None
    assert data["ratios"][0]["equal_tokens"] is True
    assert f"| adaptive_s42 | 768 | {a['final_val_bpb']:.4f} |" in md
    # a second call reuses the finished runs
    mtime = os.path.getmtime(runs / "adaptive_s42" / "train.log")
    compare_runs.main([f"--out={comparison}", "--", *TINY, "--num_iterations=12", "--eval_every=6"])
    assert os.path.getmtime(runs / "adaptive_s42" / "train.log") == mtime


def test_plots_finished_and_running(comparison, tmp_path):
    runs = comparison / "base_checkpoints"
    written = plot_svd.make_figures(str(runs / "adaptive_s42"), str(tmp_path / "f"), baseline=str(runs / "baseline_s42"),
                                    spectra=True)
    names = {os.path.basename(p) for p in written}
    assert names == {"loss_bpb.png", "mode_rank.png", "alignment_ratio.png", "principal_alignment.png", "subspace.png", "spectra.png"}
    for p in written:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and 5_000 < os.path.getsize(p) < 2_000_000
    # a run still in progress: no config.json / checkpoint yet, a torn last JSONL line, a log cut mid-run
    live = tmp_path / "live"
    live.mkdir()
    shutil.copy(runs / "adaptive_s42" / "command.txt", live)
    lines = (runs / "adaptive_s42" / "svd_metrics.jsonl").read_text().splitlines(True)
    (live / "svd_metrics.jsonl").write_text("".join(lines[:9]) + lines[9][:40])
    log = (runs / "adaptive_s42" / "train.log").read_text().splitlines(True)
    (live / "train.log").write_text("".join(log[: len(log) // 2]))
    written = plot_svd.make_figures(str(live), str(tmp_path / "g"))
    assert {os.path.basename(p) for p in written} == names - {"spectra.png"}
    assert len(read_jsonl(str(live / "svd_metrics.jsonl"))) == 9


def test_monitor_follows_growing_file(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    # thresholds come from the run's config, here deliberately not the defaults
    (run / "config.json").write_text(json.dumps({"train_config": {"svd_ratio_enter": 3.0, "svd_ratio_exit": 1.5,
                                                                  "svd_overlap_stable": 0.5, "svd_stable_rule": False}}))
    path = run / "svd_metrics.jsonl"

    def rec(step, **kw):
        r = {"step": step, "layer": "block0.attn.c_q", "mode": "full", "shape": [8, 8], "action": "keep",
             "reason": "continue_current_mode", "mode_after": "full", "r_after": 8, "k": 2,
             "alignment_ratio": 1.0, "update_alignment_ratio": 1.0, "subspace_overlap_above_chance": 0.9}
        r.update(kw)
        return json.dumps(r) + "\n"

    follower = monitor_svd.Follower(str(path))
    mon = monitor_svd.Monitor(monitor_svd.thresholds_of(str(run))[0])
    assert follower.new_records() == []  # not created yet
    path.write_text(rec(10, alignment_ratio=2.5))  # above the default 2.0, below this run's 3.0
    events = [e for r in follower.new_records() for e in mon.feed(r)]
    assert events == []  # and the stable rule (overlap 0.9 >= 0.5) is off in this run: no event for it
    full = rec(20, alignment_ratio=3.5, action="to_lowrank", reason="gradient_clobbering_risk", mode_after="lowrank",
               r_after=6)
    with open(path, "a") as f:
        f.write(full[:30])  # half a line: not read yet
    assert follower.new_records() == []
    with open(path, "a") as f:
        f.write(full[30:])
    events = [e for r in follower.new_records() for e in mon.feed(r)]
    assert any("SWITCH full -> lowrank" in e and "gradient_clobbering_risk" in e for e in events)
    assert any("alignment_ratio=3.5 crossed svd_ratio_enter=3.0 -> gradient_clobbering_risk" in e for e in events)
    with open(path, "a") as f:
        f.write(rec(30, mode="lowrank", mode_after="lowrank", r_after=4, alignment_ratio=1.2))
    events = [e for r in follower.new_records() for e in mon.feed(r)]
    assert any("r 6 -> 4" in e for e in events)
    # the first low-rank analysis is already on the exit side of this run's 1.5: reported once
    assert any("alignment_ratio=1.2 crossed svd_ratio_exit=1.5 -> clobbering_risk_passed" in e for e in events)
    path.write_text(rec(5))  # a new run replaced the file
    assert [r["step"] for r in follower.new_records()] == [5]
    monitor_svd.main([str(run), "--once"])
    out = capsys.readouterr().out
    assert "svd_ratio_enter=3.0" in out and "--- analysis at step 5" in out


def test_forgetting_bookkeeping(base, tmp_path):
    dirs = {}
    for domain in ("wiki", "shakespeare"):
        dirs[domain] = str(tmp_path / domain)
        write_shards(offline_documents([domain], max_chars_per_domain=150_000), dirs[domain], docs_per_shard=200, seed=1,
                     source=f"offline:{domain}")
    out = tmp_path / "fg"
    forgetting.main([f"--data_a={dirs['wiki']}", f"--data_b={dirs['shakespeare']}", "--steps_a=6", "--steps_b=6",
                     "--measure_every=3", f"--out={out}", "--variants=baseline,adaptive", "--", *TINY, "--eval_every=-1"])
    data = json.loads((out / "forgetting.json").read_text())
    assert [r["variant"] for r in data["results"]] == ["baseline", "adaptive"]
    for r in data["results"]:
        # A and B measured on their own val shards, before B (after 6 updates), every 3 B-steps, after B
        assert [c["step"] for c in r["curve"]] == [6, 9, 12]
        for c in r["curve"]:
            assert c["A_val_shard"] == os.path.join(dirs["wiki"], "val_00000.parquet")
            assert c["B_val_shard"] == os.path.join(dirs["shakespeare"], "val_00000.parquet")
        # "before B" is exactly phase A's final evaluation (same weights, A's val shard)
        assert r["a_bpb_before"] == pytest.approx(r["phase_a_final_val_bpb"], abs=1e-6)
        assert r["forgetting"] == pytest.approx(r["a_bpb_after"] - r["a_bpb_before"])
        cfg_b = json.loads(open(os.path.join(r["dir_b"], "config.json")).read())
        assert cfg_b["step"] == 12 and cfg_b["train_config"]["data_dir"] == dirs["shakespeare"]
        assert r["b_bpb_after"] == pytest.approx(cfg_b["val_bpb"], abs=1e-6)  # the loop's own last eval on B
        assert len(r["phase_b_losses"]) == 6 and len(r["phase_a_losses"]) == 6
        # "after B" re-measured independently from the saved weights (a plain GPT, dense state dict)
        ckpt = load_checkpoint(os.path.join(r["dir_b"], "checkpoint.pt"))
        from nanochat.dataloader import DataLoader
        from nanochat.gpt import GPT, GPTConfig
        from nanochat.loss_eval import evaluate_bpb
        from nanochat.tokenizer import get_token_bytes, get_tokenizer
        model = GPT(GPTConfig(**ckpt["metadata"]["model_config"]))
        model.load_state_dict(ckpt["model"], strict=True)
        model.eval()
        loader = DataLoader(get_tokenizer(), 1, 64, "val", "cpu", data_dir=dirs["wiki"])
        assert evaluate_bpb(model, loader, 10, get_token_bytes()) == pytest.approx(r["a_bpb_after"], abs=1e-5)
    adaptive = data["results"][1]
    b_records = read_jsonl(os.path.join(adaptive["dir_b"], "svd_metrics.jsonl"))
    assert b_records and min(r["step"] for r in b_records) > 6  # phase B's analyses only, in B's own file
    assert adaptive["phase_b_svd"]["analyses"] == len([r for r in b_records if "mode_after" in r])
    assert data["results"][0]["phase_b_svd"] is None
    # each phase folder names its thresholds for the monitor before any checkpoint exists
    only_cmd = tmp_path / "only_cmd"
    only_cmd.mkdir()
    shutil.copy(os.path.join(adaptive["dir_b"], "command.txt"), only_cmd)
    settings, source = run_settings(str(only_cmd))
    assert source.endswith("command.txt") and settings["data_dir"] == dirs["shakespeare"] and settings["resume"] is True
    assert monitor_svd.thresholds_of(str(only_cmd))[0]["svd_ratio_enter"] == 2.0
    log = parse_log(None)
    assert log["steps"] == []
    assert "| baseline |" in (out / "forgetting.md").read_text()
