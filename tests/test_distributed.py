"""Distributed training on CPU (gloo): 2 ranks against 1 process with 2x gradient accumulation.

The runs go through tests/dist_run.py, which calls the real training loop with the real adaptive
hook and writes per-rank results. Ranks read disjoint row groups, so the single-process reference
takes micro-batch i from the loader of rank i % 2 (DIST_RUN_EMULATE=2): both runs then see exactly
the same token windows in every step, and the comparison tests the distributed code, not data order.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, free_port

RUNNER = os.path.join(ROOT, "tests", "dist_run.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# 12 matrices (attention + MLP of 2 blocks) split over the ranks; the protection dial (10% of each
# matrix: k > 0 at random init), an entry test that passes 9 times in 10, an exit that almost never does
# and patience 1 make layers switch to low rank and stay there (refreshing their bases), so bases,
# momentum and the per-layer history really cross ranks; fp32, as the one process and the ranks must not
# each time bf16 on their own
FLAGS = ["--depth=2", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=256",
         "--eval_every=4", "--eval_tokens=512", "--sample_every=-1", "--device_type=cpu", "--dtype=float32",
         "--svd_interval=2", "--adaptive_svd_target_layer=-1", "--svd_targets=all", "--svd_protect_frac=0.1",
         "--svd_alpha=0.9", "--svd_exit_p=0.99", "--svd_patience=1"]


@pytest.fixture
def env(prepared_base):
    return dict(os.environ, NANOCHAT_BASE_DIR=str(prepared_base), OMP_NUM_THREADS="1", WANDB_MODE="disabled")


def run(cmd, env, out, timeout=240, **extra):
    r = subprocess.run(cmd, cwd=out, env=dict(env, DIST_RUN_OUT=str(out), **extra), capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    return r


def load(out, rank):
    with open(os.path.join(out, f"rank{rank}.json")) as f:
        return json.load(f)


def decisions(records):
    return [(r["step"], r["layer"], r["action"], r["reason"], r.get("mode_after"), r.get("r_after")) for r in records]


def test_two_gloo_ranks_match_one_process_with_accumulation(env, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    two.mkdir(), one.mkdir()
    r2 = run([*TORCHRUN, "--standalone", "--nproc_per_node=2", RUNNER, *FLAGS, "--num_iterations=8", f"--output_dir={two}"], env, two)
    r1 = run([sys.executable, RUNNER, *FLAGS, "--num_iterations=8", f"--output_dir={one}"], env, one, DIST_RUN_EMULATE="2")
    assert "Distributed: 2 ranks, backend gloo" in r2.stdout
    assert "gradient accumulation steps: 1" in r2.stdout and "gradient accumulation steps: 2" in r1.stdout
    assert "analysis spread over 2 ranks by layer (layers per rank: 6, 6)" in r2.stdout
    rank0, rank1, ref = load(two, 0), load(two, 1), load(one, 0)

    # every rank logged the same records and holds the same weights, bases and momentum
    assert rank0["records"] == rank1["records"]
    assert rank0["params"] == rank1["params"] and rank0["momentum"] == rank1["momentum"]
    assert rank0["losses"] == rank1["losses"]
    # only rank 0 wrote the metrics file: one line per record, not two
    lines = open(two / "base_checkpoints/d2/svd_metrics.jsonl").read().splitlines()
    assert len(lines) == len(rank0["records"]) == 4 * 12

    # the same decisions as one process with 2x accumulation, and the same numbers to float tolerance
    assert decisions(rank0["records"]) == decisions(ref["records"])
    actions = {r["action"] for r in rank0["records"]}
    assert "to_lowrank" in actions, "the test needs a switch to low rank"
    assert any(r["mode"] == "lowrank" and r["action"] == "keep" for r in rank0["records"]), "and a refresh"
    assert any(name.endswith(".U_k") for name in rank0["params"]), "and a layer protected at the end"
    assert rank0["losses"] == pytest.approx(ref["losses"], rel=1e-5, abs=1e-6)
    assert rank0["val_bpb"] == pytest.approx(ref["val_bpb"], rel=1e-6)
    for a, b in zip(rank0["records"], ref["records"]):
        for key in ("alignment_ratio", "update_alignment_ratio", "subspace_overlap", "reconstruction_error"):
            if a.get(key) is None:
                assert b.get(key) is None
            else:
                assert a[key] == pytest.approx(b[key], rel=1e-3, abs=1e-5), (a["step"], a["layer"], key)
    ck2 = torch.load(two / "base_checkpoints/d2/checkpoint.pt")
    ck1 = torch.load(one / "base_checkpoints/d2/checkpoint.pt")
    for name, t in ck1["model"].items():
        assert torch.allclose(ck2["model"][name], t, rtol=1e-4, atol=1e-5), name
    assert ck2["metadata"]["world_size"] == 2 and len(ck2["loop"]["dataloader"]) == 2


def launch_ranks(env, out, world=2, **extra):
    """Start the ranks without torchrun (no agent that kills the others), so each one's own fate is seen."""
    port = free_port()
    procs = []
    for rank in range(world):
        rank_env = dict(env, DIST_RUN_OUT=str(out), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **extra)
        procs.append(subprocess.Popen([sys.executable, RUNNER, *FLAGS, "--num_iterations=4", f"--output_dir={out}"],
                                      cwd=out, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=180)
            results.append((p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return results


@pytest.mark.slow  # keeps the default suite under 2 minutes; CI runs it
def test_failed_svd_on_one_rank_skips_its_layers_on_every_rank(env, tmp_path):
    results = launch_ranks(env, tmp_path, DIST_RUN_FAIL_SVD_RANK="1")
    assert all(rc == 0 for rc, _, _ in results), results[0][2][-2000:] + results[1][2][-2000:]
    rank0, rank1 = load(tmp_path, 0), load(tmp_path, 1)
    assert rank0["records"] == rank1["records"] and rank0["params"] == rank1["params"]
    for step in sorted({r["step"] for r in rank0["records"]}):  # rank 1's layers are skipped, rank 0's are not
        records = [r for r in rank0["records"] if r["step"] == step]
        skipped = {r["layer"] for r in records if r["reason"].startswith("svd_failed: injected failure")}
        analysed = {r["layer"] for r in records if r["action"] != "skipped"}
        assert len(records) == 12 and skipped and analysed and len(skipped | analysed) == 12, step


@pytest.mark.slow  # keeps the default suite under 2 minutes; CI runs it
def test_an_error_on_one_rank_stops_every_rank_without_a_hang(env, tmp_path):
    results = launch_ranks(env, tmp_path, DIST_RUN_RAISE_RANK="1")
    for rc, _, stderr in results:
        assert rc != 0
        assert "failed on rank 1: ValueError: injected planning error" in stderr


@pytest.mark.slow  # the loop under torchrun (tests/dist_run.py) runs in the default suite above
def test_torchrun_baseline_script_on_two_gloo_ranks(env, tmp_path):
    cmd = [*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "scripts.base_train", "--depth=2", "--max_seq_len=64",
           "--device_batch_size=2", "--total_batch_size=256", "--num_iterations=3", "--eval_tokens=256", "--sample_every=-1",
           "--device_type=cpu", f"--output_dir={tmp_path}"]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Distributed: 2 ranks, backend gloo" in r.stdout and "step 00003/00003" in r.stdout
    assert r.stdout.count("Minimum validation bpb") == 1  # printed by rank 0 only
    ckpt = torch.load(tmp_path / "base_checkpoints/d2_baseline/checkpoint.pt")
    assert ckpt["metadata"]["world_size"] == 2


def test_owners_balance_by_size_first_then_by_measured_time():
    from types import SimpleNamespace

    from nanochat.adaptive_cycle import Layer, assign_owners

    def layer(name, n_out, n_in):
        return Layer(name, SimpleNamespace(weight=torch.empty(n_out, n_in, device="meta")))

    shapes = {"q": (1280, 1280), "k": (1280, 1280), "v": (1280, 1280), "o": (1280, 1280), "fc": (5120, 1280),
              "proj": (1280, 5120)}
    layers = {name: layer(name, *shape) for name, shape in shapes.items()}
    by_size = assign_owners(layers, 2)
    assert by_size["fc"] != by_size["proj"] and sorted(by_size.values()) == [0, 0, 0, 1, 1, 1]
    assert assign_owners(layers, 1) == dict.fromkeys(layers, 0)
    # measured: the wide projection costs 2.6 s, its transpose 1.1 s, each square 0.4 s: best split 2.6 | 1.1 + 4 x 0.4
    seconds = {"q": 0.4, "k": 0.4, "v": 0.4, "o": 0.4, "fc": 1.1, "proj": 2.6}
    for name, s in seconds.items():
        layers[name].seconds = s
    by_time = assign_owners(layers, 2)
    load = [sum(seconds[d] for d, r in by_time.items() if r == rank) for rank in (0, 1)]
    assert max(load) == pytest.approx(2.7) and by_time == assign_owners(dict(layers), 2)


@pytest.mark.slow
def test_replay_on_two_gloo_ranks_follows_each_ranks_own_streams(env, tmp_path):
    """Each rank mixes its own disjoint row groups of both directories with its own draws; the checkpoint holds
    every rank's replay state, which is where a fresh loader of that rank is after the same batches."""
    from nanochat.dataloader import ReplayLoader
    from nanochat.dataset import offline_documents, write_shards
    from nanochat.tokenizer import Tokenizer

    replay = str(tmp_path / "replay")
    write_shards(offline_documents(["shakespeare"], max_chars_per_domain=100_000), replay, docs_per_shard=40, seed=5)
    data = os.path.join(env["NANOCHAT_BASE_DIR"], "base_data")
    flags = ["--depth=2", "--max_seq_len=64", "--device_batch_size=2", "--total_batch_size=256", "--num_iterations=6",
             "--eval_every=-1", "--eval_tokens=512", "--sample_every=-1", "--device_type=cpu", f"--replay_data_dir={replay}",
             "--replay_fraction=0.3", f"--output_dir={tmp_path}"]
    r = run([*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "scripts.base_train", *flags], env, ROOT)
    assert "Replay: 30.0% of the training sequences from" in r.stdout
    states = torch.load(tmp_path / "base_checkpoints/d2_baseline/checkpoint.pt")["loop"]["dataloader"]
    tok = Tokenizer.from_directory(os.path.join(env["NANOCHAT_BASE_DIR"], "tokenizer"))
    for rank, state in enumerate(states):
        fresh = ReplayLoader(tok, 2, 64, "cpu", data, replay, 0.3, 42, rank=rank, world_size=2)
        for _ in range(6):
            next(fresh)
        assert state == fresh.state_dict() and state["sequences"] == 12
    assert states[0] != states[1]


@pytest.mark.slow
def test_bench_distributed_runs_the_real_hook_on_one_and_two_ranks(env, tmp_path):
    r = run([sys.executable, "-m", "scripts.bench_distributed", "--model_dim=256", "--analyses=2"], env, tmp_path)
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "2"] and len(rows[1]) == 8, r.stdout  # two ranks: two CPU times
    assert all(float(x) > 0 for row in rows for x in row[1:3]), r.stdout
