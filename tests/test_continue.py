"""Continued training on the one loop: --init_from, --replay_data_dir/--replay_fraction, --extra_val_dir, and the
observe policy (the detector's readings in a run that trains like the baseline). Tiny d2 runs on two real domains."""

import copy
import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from nanochat.adaptive_cycle import AdaptiveConfig, AdaptiveSVDHook
from nanochat.checkpoint_manager import CHECKPOINT_NAME, load_checkpoint
from nanochat.common import UserError
from nanochat.dataloader import DataLoader
from nanochat.runs import read_jsonl
from nanochat.tokenizer import get_tokenizer
from nanochat.train import TrainConfig, train
from tests.conftest import ROOT, StopAt

TINY = dict(depth=2, max_seq_len=64, device_batch_size=1, total_batch_size=64, eval_tokens=640, sample_every=-1,
            device_type="cpu", dtype="float32")  # runs compared here must not each time bf16 against fp32 (--dtype=auto) on their own



@pytest.fixture(scope="module")
def phase_a(prepared_base, domains, tmp_path_factory):
    """A 6-step baseline run on wiki: the checkpoint the continued runs start from."""
    mp = pytest.MonkeyPatch()
    mp.setenv("NANOCHAT_BASE_DIR", str(prepared_base))
    out = tmp_path_factory.mktemp("a")
    result = train(TrainConfig(**TINY, num_iterations=6, eval_every=-1, warmdown_ratio=0.5, data_dir=domains["wiki"],
                               output_dir=str(out), model_tag="A"))
    mp.undo()
    return os.path.join(result["ckpt_dir"], CHECKPOINT_NAME), result


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


class Capture(AdaptiveSVDHook):
    """The static-policy hook, plus a copy of the weights and optimizer state as update 1 starts."""

    def after_backward(self, step, last_step):
        if step == 1:
            self.at_start = {"model": {k: v.clone() for k, v in self.run.model.state_dict().items()},
                             "muon": copy.deepcopy(self.run.muon.state_dict()),
                             "adamw": copy.deepcopy(self.run.adamw.state_dict()),
                             "muon_lr": self.run.muon.param_groups[0]["initial_lr"]}
        super().after_backward(step, last_step)


def test_init_from_carries_weights_and_optimizer_state_with_a_fresh_schedule(base, domains, phase_a, tmp_path):
    source, a = phase_a
    before = (sha256(source), os.path.getmtime(source))
    ckpt_a = load_checkpoint(source)
    cfg = AdaptiveConfig(**TINY, num_iterations=4, eval_every=2, warmup_ratio=0.5, matrix_lr=0.01, data_dir=domains["shakespeare"],
                         extra_val_dir=domains["wiki"], init_from=source, output_dir=str(tmp_path), model_tag="B",
                         svd_policy="static", svd_protect_frac=0.1, adaptive_svd_target_layer=-1, svd_targets="all")
    hook = Capture(cfg)
    b = train(cfg, hook=hook)
    # the source checkpoint is read, never written
    assert (sha256(source), os.path.getmtime(source)) == before
    # weights, Muon momentum and AdamW moments are A's final ones when B's first update starts
    start = hook.at_start
    assert all(torch.equal(start["model"][k], ckpt_a["model"][k]) for k in ckpt_a["model"])
    assert start["muon"]["momentum"].keys() == ckpt_a["optim"]["muon"]["momentum"].keys()
    assert all(torch.equal(v, ckpt_a["optim"]["muon"]["momentum"][k]) for k, v in start["muon"]["momentum"].items())
    for i, st in ckpt_a["optim"]["adamw"]["state"].items():
        assert all(torch.equal(st[k], start["adamw"]["state"][i][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
    assert start["muon_lr"] == 0.01 and ckpt_a["optim"]["muon"]["group"]["initial_lr"] == 0.02  # B's own settings
    # a fresh step counter and LR schedule: warmup from the start (A ended in its warmdown at lrm 1/3)
    rows = read_jsonl(os.path.join(b["ckpt_dir"], "train_metrics.jsonl"))
    a_rows = read_jsonl(os.path.join(a["ckpt_dir"], "train_metrics.jsonl"))
    assert a_rows[-1]["lrm"] == pytest.approx(1 / 3)
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4] and [r["lrm"] for r in rows[1:]] == [0.5, 1.0, 1.0, 1.0]
    # the first measurement of A's val shard is A's own final evaluation (same weights, shard and tokens)
    assert rows[0]["extra_val_bpb"] == a_rows[-1]["val_bpb"] == a["val_bpb"]
    assert [r["step"] for r in rows if "val_bpb" in r] == [0, 2, 4] == [r["step"] for r in rows if "extra_val_bpb" in r]
    # a fresh data position on B's data: the loader state is where a fresh loader is after 4 batches
    fresh = DataLoader(get_tokenizer(), 1, 64, "train", "cpu", data_dir=domains["shakespeare"])
    for _ in range(4):
        next(fresh)
    ckpt_b = load_checkpoint(os.path.join(b["ckpt_dir"], CHECKPOINT_NAME))
    assert ckpt_b["loop"]["dataloader"] == [fresh.state_dict()] and ckpt_b["loop"]["step"] == 4
    # fresh adaptive-SVD state: the static policy protects at B's step 1, the top 10% of A's final spectrum (6 steps
    # of A learned nothing that stands apart, so the dial sets how much)
    records = read_jsonl(os.path.join(b["ckpt_dir"], "svd_metrics.jsonl"))
    first = [r for r in records if r["step"] == 1]
    assert len(first) == 12 and all(r["action"] == "to_lowrank" and r["reason"] == "static_protection" for r in first)
    config = json.loads(open(os.path.join(b["ckpt_dir"], "config.json")).read())
    assert config["init_from"] == {"path": os.path.abspath(source), "step": 6, "run_kind": "baseline",
                                   "val_bpb": a["val_bpb"], "data_dir": domains["wiki"]}
    assert config["train_config"]["init_from"] == source and ckpt_b["metadata"]["init_from"]["step"] == 6



def test_continued_run_with_replay_resumes_exactly(base, domains, phase_a, tmp_path):
    source, _ = phase_a
    cfg = dict(TINY, num_iterations=8, eval_every=4, data_dir=domains["shakespeare"], extra_val_dir=domains["wiki"],
               replay_data_dir=domains["wiki"], replay_fraction=0.4, init_from=source, model_tag="B")
    full = train(TrainConfig(**cfg, output_dir=str(tmp_path / "full")))
    first = train(TrainConfig(**cfg, output_dir=str(tmp_path / "cut")), hook=StopAt(3))
    assert first["stopped_by_signal"] == signal.SIGUSR1 and first["losses"] == full["losses"][:3]
    rest = train(TrainConfig(**cfg, output_dir=str(tmp_path / "cut"), resume=True))
    assert rest["losses"] == full["losses"][3:]
    ckpts = [load_checkpoint(str(tmp_path / d / "base_checkpoints/B" / CHECKPOINT_NAME)) for d in ("full", "cut")]
    assert all(torch.equal(ckpts[0]["model"][k], ckpts[1]["model"][k]) for k in ckpts[0]["model"])
    state = ckpts[0]["loop"]["dataloader"][0]
    assert state["sequences"] == 8 and 0 < state["replayed"] < 8 and state == ckpts[1]["loop"]["dataloader"][0]
    rows = [read_jsonl(str(tmp_path / d / "base_checkpoints/B/train_metrics.jsonl")) for d in ("full", "cut")]
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("dt", "tok_per_sec", "total_time")} for r in rs]
    assert strip(rows[0]) == strip(rows[1])  # the same rows, evaluations of both val shards included
    # the replayed sequences changed training: without replay the same run ends elsewhere
    plain = train(TrainConfig(**{k: v for k, v in cfg.items() if not k.startswith("replay")}, output_dir=str(tmp_path / "plain")))
    assert plain["losses"] != full["losses"]


def test_observe_policy_trains_exactly_like_the_baseline(base, tmp_path):
    cfg = dict(TINY, num_iterations=6, eval_every=-1)
    plain = train(TrainConfig(**cfg, output_dir=str(tmp_path / "plain")))
    observed_cfg = AdaptiveConfig(**cfg, output_dir=str(tmp_path / "observe"), svd_policy="observe", svd_interval=2,
                                  adaptive_svd_target_layer=-1, svd_targets="all")
    observed = train(observed_cfg, hook=AdaptiveSVDHook(observed_cfg))
    assert observed["losses"] == plain["losses"]
    a, b = (load_checkpoint(os.path.join(r["ckpt_dir"], CHECKPOINT_NAME))["model"] for r in (plain, observed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = read_jsonl(os.path.join(observed["ckpt_dir"], "svd_metrics.jsonl"))
    assert len(records) == 3 * 12 and {r["mode_after"] for r in records} == {"full"}
    assert {r["reason"] for r in records} == {"observe_only"}
    assert any(isinstance(r["alignment_ratio"], float) for r in records)  # the detector's readings are there


def test_a_continued_run_takes_its_baseline_analysis_at_its_first_step(base, domains, phase_a, tmp_path):
    """The first analysis on the new data knows what the weights learned before, so the adaptive rules can
    act from the run's second analysis on (a fresh run's first analysis stays at svd_interval)."""
    source, _ = phase_a
    cfg = AdaptiveConfig(**TINY, num_iterations=4, eval_every=-1, data_dir=domains["shakespeare"], init_from=source,
                         svd_interval=2, adaptive_svd_target_layer=-1, svd_targets="all", output_dir=str(tmp_path))
    run = train(cfg, hook=AdaptiveSVDHook(cfg))
    records = read_jsonl(os.path.join(run["ckpt_dir"], "svd_metrics.jsonl"))
    assert sorted({r["step"] for r in records}) == [1, 2, 4]
    assert {r["reason"] for r in records if r["step"] == 1} == {"initial_svd_baseline"}
    assert all(r["k_prev"] is not None for r in records if r["step"] == 2)  # A's basis is the reference


def test_init_from_and_replay_refusals(base, domains, phase_a, tmp_path):
    source, _ = phase_a
    own = tmp_path / "base_checkpoints" / "B"
    cases = [
        (dict(depth=3, init_from=source), "holds another model shape"),
        (dict(init_from=str(tmp_path / "missing.pt")), "no checkpoint at"),
        (dict(init_from=str(own / CHECKPOINT_NAME)), "in this run's own folder"),
        (dict(replay_fraction=0.1), "--replay_data_dir and --replay_fraction go together"),
        (dict(replay_data_dir=domains["wiki"]), "--replay_data_dir and --replay_fraction go together"),
        (dict(replay_data_dir=domains["wiki"], replay_fraction=1.0), r"--replay_fraction=1.0 is out of range: use in \[0, 1\)"),
        (dict(replay_data_dir=str(tmp_path / "nowhere"), replay_fraction=0.1), "no train shards"),
        (dict(extra_val_dir=str(tmp_path / "nowhere")), "no val shards"),
    ]
    for flags, message in cases:
        cfg = TrainConfig(**{**TINY, "num_iterations": 2, "output_dir": str(tmp_path), "model_tag": "B",
                             "data_dir": domains["shakespeare"], **flags})
        with pytest.raises(UserError, match=message):
            train(cfg)
        assert not own.exists()  # nothing written
    # a resumed run keeps the --init_from it started with
    train(TrainConfig(**TINY, num_iterations=2, output_dir=str(tmp_path), model_tag="B", data_dir=domains["shakespeare"],
                      init_from=source))
    with pytest.raises(UserError, match="--resume: the checkpoint was trained with --init_from="):
        train(TrainConfig(**TINY, num_iterations=2, output_dir=str(tmp_path), model_tag="B", data_dir=domains["shakespeare"],
                          resume=True))
    # the command line says it in one line
    r = subprocess.run([sys.executable, "-m", "scripts.base_train", *[f"--{k}={v}" for k, v in TINY.items() if k != "depth"], "--depth=3",
                        f"--init_from={source}", f"--output_dir={tmp_path / 'cli'}"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env=dict(os.environ))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "another model shape" in r.stderr


# ------------------------------------------------------------------------------------------------ --freeze

def test_freeze_keeps_the_named_parameters_bit_for_bit_and_trains_the_rest(base, domains, phase_a, tmp_path):
    source, _ = phase_a
    start = load_checkpoint(source)["model"]
    # one step without clipping (which would measure the frozen gradients too): with --freeze=blocks the embedding
    # and lm_head move exactly as in a run without --freeze, and no block matrix moves
    cfg = dict(TINY, num_iterations=1, eval_every=-1, grad_clip=0.0, data_dir=domains["shakespeare"], init_from=source,
               model_tag="B")
    runs = {freeze: load_checkpoint(os.path.join(train(TrainConfig(**cfg, freeze=freeze, output_dir=str(tmp_path / (freeze or "free"))))
                                                 ["ckpt_dir"], CHECKPOINT_NAME))["model"] for freeze in ("", "blocks")}
    for k, w in runs["blocks"].items():
        block = k.startswith("transformer.h.")
        assert torch.equal(w, start[k]) == block and torch.equal(w, runs[""][k]) == (not block), k
    # several steps with clipping: the embedding and lm_head stay bit for bit, every block matrix moves
    run = train(TrainConfig(**dict(cfg, num_iterations=3, grad_clip=1.0), freeze="embedding,lm_head", output_dir=str(tmp_path / "e")))
    ckpt = load_checkpoint(os.path.join(run["ckpt_dir"], CHECKPOINT_NAME))
    for k, w in ckpt["model"].items():
        assert torch.equal(w, start[k]) == (not k.startswith("transformer.h.")), k
    assert ckpt["metadata"]["train_config"]["freeze"] == "embedding,lm_head"


def test_freeze_refusals(base, cli):
    for value, message in (("embedding,lm_head,blocks", "freezes every parameter of the model: nothing would train"),
                           ("wte", "--freeze=wte is not valid: use a comma list of embedding, lm_head and blocks"),
                           ("blocks,blocks", "--freeze=blocks,blocks is not valid")):
        code, out, err = cli("scripts.base_train", *[f"--{k}={v}" for k, v in TINY.items()], f"--freeze={value}")
        assert code == 2 and err.count("\n") == 1 and message in err, err


# ------------------------------------------------------------------------------------------------ --init_data=continue

def test_init_data_continue_reads_on_where_the_source_stopped(base, domains, tmp_path):
    a = train(TrainConfig(**TINY, num_iterations=5, eval_every=-1, data_dir=domains["wiki"], data_seed=4,
                          output_dir=str(tmp_path), model_tag="A"))
    source = os.path.join(a["ckpt_dir"], CHECKPOINT_NAME)
    b = train(TrainConfig(**TINY, num_iterations=3, eval_every=-1, data_dir=domains["wiki"], data_seed=4, init_from=source,
                          init_data="continue", output_dir=str(tmp_path), model_tag="B"))
    # B's three batches are the sixth to eighth of the stream A read: the loader stands where one stands after eight
    reference = DataLoader(get_tokenizer(), 1, 64, "train", "cpu", data_dir=domains["wiki"], data_seed=4)
    for _ in range(8):
        next(reference)
    assert load_checkpoint(os.path.join(b["ckpt_dir"], CHECKPOINT_NAME))["loop"]["dataloader"] == [reference.state_dict()]
    fresh = train(TrainConfig(**TINY, num_iterations=3, eval_every=-1, data_dir=domains["wiki"], data_seed=4, init_from=source,
                              output_dir=str(tmp_path), model_tag="C"))
    assert fresh["losses"] != b["losses"]  # the default starts the data over
    own = tmp_path / "base_checkpoints" / "D"
    for flags, message in ((dict(data_dir=domains["shakespeare"], data_seed=4), "--init_data=continue: the run of --init_from="),
                           (dict(data_dir=domains["wiki"], data_seed=5), "used --data_seed=4, not 5"),
                           (dict(data_dir=domains["wiki"], data_seed=4, init_from=""), "give --init_from, and no replay"),
                           (dict(data_dir=domains["wiki"], data_seed=4, replay_data_dir=domains["shakespeare"],
                                 replay_fraction=0.1), "give --init_from, and no replay")):
        cfg = TrainConfig(**{**TINY, "num_iterations": 2, "output_dir": str(tmp_path), "model_tag": "D", "init_from": source,
                             "init_data": "continue", **flags})
        with pytest.raises(UserError, match=message):
            train(cfg)
        assert not own.exists()


# ------------------------------------------------------------------------------------------------ --svd_embed_frac

def embed_run(source, domains, out, frac, **kw):
    cfg = AdaptiveConfig(**{**TINY, "num_iterations": 4, "eval_every": -1, "data_dir": domains["shakespeare"],
                            "init_from": source, "svd_policy": "observe", "svd_interval": 2, "svd_embed_frac": frac,
                            "output_dir": str(out), "model_tag": "B", **kw})
    return train(cfg, hook=AdaptiveSVDHook(cfg))


def test_embedding_protection_keeps_the_top_triples_of_the_source_exact(base, domains, phase_a, tmp_path):
    source, _ = phase_a
    start = load_checkpoint(source)["model"]
    run = embed_run(source, domains, tmp_path / "p", 0.25)
    ckpt = load_checkpoint(os.path.join(run["ckpt_dir"], CHECKPOINT_NAME))
    for key, name in (("transformer.wte.weight", "embedding"), ("lm_head.weight", "lm_head")):
        W0, W = start[key].double(), ckpt["model"][key].double()
        t = {k: v.double() for k, v in ckpt["hook"]["embed"][name].items()}  # the triples the run protected
        U_k, S_k, V_k = t["U_k"], t["S_k"], t["V_k"]
        assert U_k.shape[1] == 32  # floor(0.25 * 128): d2 is 128 wide
        # they are the source's top-32 singular triples (an independent fp64 SVD; fp32 LAPACK accuracy) ...
        assert torch.allclose(S_k, torch.linalg.svdvals(W0)[:32], rtol=1e-5)
        assert float((W0 @ V_k - U_k * S_k).norm()) < 1e-4 * float(S_k[0]), key
        # ... and 4 steps later they are still exactly that (W V_k = U_k S_k, U_k^T W = S_k V_k^T): what moved, moved
        # in the minor subspace only, up to fp32 rounding of W itself
        drift = max(float(((W - W0) @ V_k).norm()), float((U_k.T @ (W - W0)).norm()))
        assert drift < 1e-6 * float(W0.norm()), (key, drift)
        assert float((W - W0).norm()) > 1e-3 * float(W0.norm()), key
    config = json.loads(open(os.path.join(run["ckpt_dir"], "config.json")).read())
    assert config["hook"]["embed_protected"] == {"embedding": 32, "lm_head": 32}
    assert ckpt["hook"]["embed"]["lm_head"]["U_k"].shape == (4096, 32)


@pytest.mark.slow
def test_embedding_protection_with_k_zero_is_the_unprotected_run_and_resumes_exactly(base, domains, phase_a, tmp_path):
    source, _ = phase_a
    plain = embed_run(source, domains, tmp_path / "plain", 0.0)
    zero = embed_run(source, domains, tmp_path / "zero", 0.005)  # floor(0.005 * 128) = 0
    assert zero["losses"] == plain["losses"]
    weights = [load_checkpoint(os.path.join(r["ckpt_dir"], CHECKPOINT_NAME))["model"] for r in (plain, zero)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    full = embed_run(source, domains, tmp_path / "full", 0.25)
    cfg = AdaptiveConfig(**{**TINY, "num_iterations": 4, "eval_every": -1, "data_dir": domains["shakespeare"], "init_from": source,
                            "svd_policy": "observe", "svd_interval": 2, "svd_embed_frac": 0.25, "output_dir": str(tmp_path / "cut"),
                            "model_tag": "B"})

    class StopAt2(AdaptiveSVDHook):
        def after_backward(self, step, last_step):
            super().after_backward(step, last_step)
            if step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)

    first = train(cfg, hook=StopAt2(cfg))
    assert first["stopped_by_signal"] == signal.SIGUSR1
    import dataclasses
    resumed_cfg = dataclasses.replace(cfg, resume=True)
    rest = train(resumed_cfg, hook=AdaptiveSVDHook(resumed_cfg))
    assert first["losses"] + rest["losses"] == full["losses"]
    a, b = (load_checkpoint(os.path.join(r["ckpt_dir"], CHECKPOINT_NAME))["model"] for r in (full, rest))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_embedding_protection_needs_init_from(base, cli):
    code, _, err = cli("scripts.base_train_adaptive_svd", *[f"--{k}={v}" for k, v in TINY.items()], "--svd_embed_frac=0.25")
    assert code == 2 and err.count("\n") == 1 and "a fresh start has learned nothing to protect: give --init_from" in err
