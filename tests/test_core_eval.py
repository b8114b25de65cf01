"""CORE evaluation: prompt rendering, continuation spans, scoring on a model whose answers are known,
the centered metric, the training-loop hook, the standalone script and bundle preparation, all on a
tiny eval bundle generated here (the real one is never downloaded in tests)."""

import csv
import functools
import http.server
import json
import os
import subprocess
import sys
import threading
import zipfile

import pytest
import torch
import torch.nn.functional as F

from nanochat import core_eval
from nanochat.common import UserError, run_cli
from nanochat.core_eval import (CoreTask, centered_accuracy, common_length, crop, download_bundle, evaluate_core,
                                load_bundle, locate, prepare_example, render_lm, render_mc, render_schema, sample_fewshot)
from tests.conftest import ROOT, free_port

TINY = dict(depth=2, max_seq_len=64, device_batch_size=2, total_batch_size=256, eval_tokens=1024,
            sample_every=-1, device_type="cpu", dtype="float32")  # runs compared here must not each time bf16 on their own

# ---------------------------------------------------------------- a tiny bundle and a model that knows the answers
#
# The oracle model below predicts "the next letter of the alphabet" (a -> b -> c ...), so the right
# option of every example here is the alphabetical one, and the accuracy of each task is known:
#   mc      4 examples, gold is the alphabetical choice in 3    -> 0.75, baseline 50% -> centered 0.5
#   schema  2 examples, both gold                               -> 1.0,  baseline 50% -> centered 1.0
#   lm      4 examples, alphabetical continuation in 1          -> 0.25, baseline 0%  -> centered 0.25
# CORE = (0.5 + 1.0 + 0.25) / 3.

MC = [{"query": "Q1", "choices": [" abc", " acb"], "gold": 0},
      {"query": "Q2", "choices": [" fhg", " fgh", " ffe"], "gold": 1},
      {"query": "Q3", "choices": [" mno", " mon"], "gold": 0},
      {"query": "Q4", "choices": [" rst", " rts"], "gold": 1}]    # wrong on purpose
SCHEMA = [{"context_options": ["xa", "xc"], "continuation": "bcd", "gold": 0},
          {"context_options": ["yk", "ym"], "continuation": "nop", "gold": 1}]
LM = [{"context": "ab ", "continuation": "cd"}, {"context": "kl", "continuation": "mz"},
      {"context": "pq", "continuation": "rt"}, {"context": "uv", "continuation": "xw"}]
EXPECTED = {"mc": 0.75, "schema": 1.0, "lm": 0.25}
EXPECTED_CORE = (0.5 + 1.0 + 0.25) / 3


def write_tiny_bundle(root, name="eval_bundle"):
    """An eval bundle in upstream's layout: core.yaml, eval_meta_data.csv, eval_data/<subdir>/*.jsonl."""
    bundle = os.path.join(str(root), name)
    os.makedirs(os.path.join(bundle, "eval_data", "tiny"), exist_ok=True)
    for fname, rows in (("mc.jsonl", MC), ("schema.jsonl", SCHEMA), ("lm.jsonl", LM)):
        with open(os.path.join(bundle, "eval_data", "tiny", fname), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(bundle, "core.yaml"), "w", encoding="utf-8") as f:
        f.write("icl_tasks:\n"
                "- label: mc\n  dataset_uri: tiny/mc.jsonl\n  num_fewshot: [2]\n  icl_task_type: multiple_choice\n"
                "  continuation_delimiter: \"\\nAnswer:\"\n"
                "- label: schema\n  dataset_uri: tiny/schema.jsonl\n  num_fewshot: [1]\n  icl_task_type: schema\n"
                "  continuation_delimiter: ''\n"
                "- label: lm\n  dataset_uri: tiny/lm.jsonl\n  num_fewshot: [0]\n  icl_task_type: language_modeling\n"
                "  continuation_delimiter: ''\n")
    with open(os.path.join(bundle, "eval_meta_data.csv"), "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Eval Task", "Task Category", "Task Type", "#shots", "#datapoints", "Random baseline", "Description"])
        w.writerow(["mc", "test", "multiple choice", 2, 4, 50.0, "alphabet"])
        w.writerow(["schema", "test", "schema", 1, 2, 50.0, "alphabet"])
        w.writerow(["lm", "test", "language modeling", 0, 4, 0.0, "alphabet"])
    return bundle


class CharTokenizer:
    """One token per character (its code point), BOS = 128: token positions are the character positions."""
    BOS = 128

    def get_bos_token_id(self):
        return self.BOS

    def get_vocab_size(self):
        return 129

    def __call__(self, text, prepend=None):
        if isinstance(text, list):
            return [self(t, prepend) for t in text]
        return ([] if prepend is None else [prepend]) + [ord(c) for c in text]


class AlphabetOracle(torch.nn.Module):
    """Logits favour chr(ord(c) + 1) after every letter c; after anything else they are flat."""

    def __init__(self, max_seq_len=None):
        super().__init__()
        table = torch.zeros(129, 129)
        for c in range(ord("a"), ord("z")):
            table[c, c + 1] = 8.0
        self.register_buffer("table", table)
        self.max_seq_len = max_seq_len
        self.calls = 0

    def forward(self, idx, targets=None, loss_reduction="mean"):
        self.calls += 1
        logits = self.table[idx]
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, 129), targets.reshape(-1), ignore_index=-1, reduction="none").view(idx.shape)


def tiny_tasks(tmp_path, max_per_task=-1):
    return load_bundle(write_tiny_bundle(tmp_path), max_per_task)


# ---------------------------------------------------------------- rendering and spans

def test_render_mc_schema_lm_hand_cases():
    shots = [{"query": "2+2=", "choices": ["3", "4"], "gold": 1}]
    assert render_mc({"query": "1+1=", "choices": ["2", "5"], "gold": 0}, " ", shots) == ["2+2= 4\n\n1+1= 2", "2+2= 4\n\n1+1= 5"]
    assert render_mc({"query": "q", "choices": ["a"], "gold": 0}, " ") == ["q a"]
    shots = [{"context_options": ["A", "B"], "continuation": "end", "gold": 0}]
    assert render_schema({"context_options": ["x", "y"], "continuation": "z"}, " ", shots) == ["A end\n\nx z", "A end\n\ny z"]
    shots = [{"context": "  one two  ", "continuation": "three"}]
    without, with_ = render_lm({"context": "four five ", "continuation": "six"}, " ", shots)
    assert without == "one two three\n\nfour five"  # contexts trimmed, trailing delimiter stripped
    assert with_ == "one two three\n\nfour five six"
    assert render_lm({"context": "Q:", "continuation": " 42"}, "\nAnswer:") == ["Q:\nAnswer:", "Q:\nAnswer: 42"]


def test_locate_continuations_by_char_positions():
    tok = CharTokenizer()
    toks = tok(["ctx abc", "ctx ab", "ctx xyz"], prepend=tok.BOS)
    seqs, starts, ends = locate("multiple_choice", toks)
    assert starts == [5, 5, 5] and ends == [8, 7, 8]                 # after the shared "ctx " (+ BOS)
    toks = tok(["one then", "two then"], prepend=tok.BOS)
    seqs, starts, ends = locate("schema", toks)
    assert [s[a:b] for s, a, b in zip(seqs, starts, ends)] == [tok(" then")] * 2
    toks = tok(["abc", "abc def"], prepend=tok.BOS)
    seqs, starts, ends = locate("language_modeling", toks)
    assert len(seqs) == 1 and seqs[0][starts[0]:ends[0]] == tok(" def")
    # a choice that is a prefix of another still gets one scored token (its last)
    seqs, starts, ends = locate("multiple_choice", tok(["q a", "q ab"], prepend=tok.BOS))
    assert starts == [3, 4] and ends == [4, 5]
    assert common_length([[1, 2, 3], [1, 2, 4]]) == 2 and common_length([[0, 2, 3], [1, 2, 3]], from_end=True) == 2


def test_locate_with_the_real_tokenizer(prepared_base, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(prepared_base))
    from nanochat.tokenizer import get_tokenizer
    tok = get_tokenizer()
    prompts = render_mc({"query": "The capital of France is", "choices": ["Paris", "London"], "gold": 0}, " ")
    seqs, starts, ends = locate("multiple_choice", tok(prompts, prepend=tok.get_bos_token_id()))
    assert [tok.decode(s[a:b]) for s, a, b in zip(seqs, starts, ends)] == [" Paris", " London"]
    seqs, starts, ends = locate("language_modeling", tok(render_lm({"context": "To be, or not ", "continuation": "to be"}, " "),
                                                         prepend=tok.get_bos_token_id()))
    assert tok.decode(seqs[0][starts[0]:ends[0]]) == " to be" and seqs[0][0] == tok.get_bos_token_id()


def test_crop_keeps_the_end_and_shifts_spans():
    tokens, starts, ends = crop([list(range(10)), list(range(4))], [6, 2], [10, 4], max_len=5)
    assert tokens == [[5, 6, 7, 8, 9], [0, 1, 2, 3]] and starts == [1, 2] and ends == [5, 4]
    task = CoreTask("lm", "language_modeling", 0, " ", 0.0, [{"context": "x" * 50, "continuation": "yz"}])
    tokens, starts, ends = prepare_example(task, 0, CharTokenizer(), max_len=8)
    assert len(tokens[0]) == 8 and tokens[0][starts[0]:ends[0]] == [ord(" "), ord("y"), ord("z")]


def test_fewshot_sampling_is_fixed_and_excludes_the_item():
    data = list(range(20))
    a = sample_fewshot(data, 3, 5)
    assert a == sample_fewshot(data, 3, 5) and 3 not in a and len(set(a)) == 5
    assert a != sample_fewshot(data, 4, 5)
    assert sorted(sample_fewshot([0, 1, 2], 1, 10)) == [0, 2]  # capped at the other examples
    assert sample_fewshot([0], 0, 3) == []


# ---------------------------------------------------------------- scoring and the metric

def test_centered_accuracy_and_core():
    assert centered_accuracy(0.25, 25.0) == 0.0 and centered_accuracy(1.0, 62.0) == pytest.approx(1.0)
    assert centered_accuracy(0.5, 25.0) == pytest.approx(1 / 3)
    assert centered_accuracy(0.3, 0.0) == pytest.approx(0.3)
    assert centered_accuracy(0.4, 50.0) == pytest.approx(-0.2)  # below chance is negative
    assert core_eval.core_metric({"a": 0.5, "b": 0.1}) == pytest.approx(0.3)


def test_oracle_model_scores_as_expected(tmp_path):
    tasks = tiny_tasks(tmp_path)
    assert [t.label for t in tasks] == ["mc", "schema", "lm"]
    assert [t.num_fewshot for t in tasks] == [2, 1, 0] and tasks[0].delimiter == "\nAnswer:"
    assert [t.random_baseline for t in tasks] == [50.0, 50.0, 0.0]
    out = evaluate_core(AlphabetOracle(), CharTokenizer(), torch.device("cpu"), tasks=tasks, log=None)
    assert out["results"] == pytest.approx(EXPECTED)
    assert out["centered_results"] == pytest.approx({"mc": 0.5, "schema": 1.0, "lm": 0.25})
    assert out["core_metric"] == pytest.approx(EXPECTED_CORE)
    assert out["examples"] == {"mc": 4, "schema": 2, "lm": 4}


def test_scores_come_from_the_continuation_losses(tmp_path, monkeypatch):
    """Replace the model's losses: the option whose span has the lowest mean loss is picked."""
    task = tiny_tasks(tmp_path)[0]
    idx = next(i for i, ex in enumerate(task.data) if ex["query"] == "Q2")
    tokens, starts, ends = prepare_example(task, idx, CharTokenizer())
    for want in range(3):
        def fake_losses(model, ids, want=want):
            losses = torch.ones(ids.shape)
            losses[want] = 0.5
            return losses
        monkeypatch.setattr(core_eval, "token_losses", fake_losses)
        assert core_eval.score_example(None, tokens, starts, ends, "multiple_choice", want, 128, "cpu")
        assert not core_eval.score_example(None, tokens, starts, ends, "multiple_choice", (want + 1) % 3, 128, "cpu")


def test_max_per_task_and_model_max_len(tmp_path):
    tasks = tiny_tasks(tmp_path, max_per_task=2)
    assert [len(t.data) for t in tasks] == [2, 2, 2]
    full = tiny_tasks(tmp_path / "again")
    assert tasks[0].data == full[0].data[:2]  # the same fixed shuffle, then the cut
    model = AlphabetOracle(max_seq_len=12)
    out = evaluate_core(model, CharTokenizer(), torch.device("cpu"), tasks=full, log=None)
    assert 0 <= out["core_metric"] <= 1 and model.calls == 10  # one forward per example, cropped prompts still run


def test_bundle_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="no CORE eval bundle .*--download_bundle"):
        load_bundle(str(tmp_path / "missing"))
    bundle = write_tiny_bundle(tmp_path)
    os.remove(os.path.join(bundle, "eval_data", "tiny", "lm.jsonl"))
    with pytest.raises(UserError, match="lacks eval_data"):
        load_bundle(bundle)
    bundle = write_tiny_bundle(tmp_path / "b")
    with open(os.path.join(bundle, "core.yaml"), "a") as f:
        f.write("- label: other\n  dataset_uri: tiny/lm.jsonl\n  icl_task_type: language_modeling\n")
    with pytest.raises(UserError, match="no random baseline for task 'other'"):
        load_bundle(bundle)


# ---------------------------------------------------------------- in the training loop and as a script

def _base_with_bundle(prepared_base, root):
    """A base dir with the session's data and tokenizer (linked, read-only) plus the tiny bundle."""
    base = root / "base"
    base.mkdir(parents=True)
    for name in ("base_data", "tokenizer"):
        os.symlink(prepared_base / name, base / name)
    write_tiny_bundle(base)
    return base


@pytest.fixture(scope="module")
def core_run(prepared_base, tmp_path_factory):
    """A 4-step tiny run with CORE every 2 steps on 3 examples per task."""
    from nanochat.train import TrainConfig, train
    root = tmp_path_factory.mktemp("core_run")
    base = _base_with_bundle(prepared_base, root)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOCHAT_BASE_DIR", str(base))
        import io
        from contextlib import redirect_stdout
        buf = io.StringIO()
        with redirect_stdout(buf):
            result = train(TrainConfig(**TINY, num_iterations=4, eval_every=-1, core_metric_every=2,
                                       core_metric_max_per_task=3, output_dir=str(root)), default_tag="d2_core")
    return {"base": base, "out_dir": root, "result": result, "stdout": buf.getvalue()}


def test_core_metric_in_training_loop(core_run):
    out = core_run["stdout"]
    lines = [l for l in out.splitlines() if "| CORE metric:" in l]
    assert [l.split("|")[0].strip() for l in lines] == ["Step 00002", "Step 00004"]
    assert "Evaluating: mc (2-shot, type: multiple_choice, 3 examples)" in out
    last = float(lines[-1].split()[-1])
    assert core_run["result"]["core_metric"] == pytest.approx(last, abs=1e-4)
    ckpt_dir = core_run["out_dir"] / "base_checkpoints" / "d2_core"
    config = json.loads((ckpt_dir / "config.json").read_text())
    assert config["core_metric"] == core_run["result"]["core_metric"] and config["core"]["step"] == 4
    assert set(config["core"]["centered_results"]) == {"mc", "schema", "lm"}
    meta = torch.load(ckpt_dir / "checkpoint.pt")["metadata"]  # weights_only: the record is plain data
    assert meta["core"]["core_metric"] == config["core_metric"]


def test_resumed_run_keeps_its_core_result(core_run, tmp_path, capsys, monkeypatch):
    """Resuming at a step whose CORE is already in the checkpoint does not evaluate it again."""
    import shutil
    from nanochat.train import TrainConfig, train
    shutil.copytree(core_run["out_dir"] / "base_checkpoints", tmp_path / "base_checkpoints")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(core_run["base"]))
    result = train(TrainConfig(**TINY, num_iterations=6, eval_every=-1, core_metric_every=2, core_metric_max_per_task=3,
                               output_dir=str(tmp_path), resume=True), default_tag="d2_core")
    lines = [l for l in capsys.readouterr().out.splitlines() if "| CORE metric:" in l]
    assert [l.split("|")[0].strip() for l in lines] == ["Step 00006"]
    config = json.loads((tmp_path / "base_checkpoints" / "d2_core" / "config.json").read_text())
    assert config["core"]["step"] == 6 and config["core_metric"] == result["core_metric"]


@pytest.mark.slow  # in CI's slow pass: keeps the default suite under 2 minutes
def test_standalone_script_end_to_end(core_run):
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(core_run["base"]), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "scripts.base_eval", "--model_tag=d2_core", f"--output_dir={core_run['out_dir']}",
                        "--max_per_task=3", "--device_type=cpu"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Evaluating: schema (1-shot, type: schema, 2 examples)" in r.stdout
    core_line = [l for l in r.stdout.splitlines() if l.startswith("CORE metric:")]
    assert core_line and float(core_line[0].split()[-1]) == pytest.approx(core_run["result"]["core_metric"], abs=1e-4)
    ckpt_dir = core_run["out_dir"] / "base_checkpoints" / "d2_core"
    record = json.loads((ckpt_dir / "core_eval.json").read_text())
    assert record["core_metric"] == pytest.approx(core_run["result"]["core_metric"]) and record["step"] == 4
    rows = list(csv.reader(open(ckpt_dir / "core_eval.csv")))
    assert rows[0][:3] == ["task", "accuracy", "centered"] and [r[0] for r in rows[1:]] == ["mc", "schema", "lm", "CORE"]


def _one_line_error(r):
    return r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_missing_bundle_stops_training_before_it_starts(base, tmp_path, cli):
    code, out, err = cli("scripts.base_train", "--depth=2", "--max_seq_len=64", "--device_batch_size=2",
                         "--total_batch_size=128", "--device_type=cpu", "--core_metric_every=10", f"--output_dir={tmp_path}")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "eval_bundle" in err and "python -m scripts.base_eval --download_bundle" in err
    assert "step 00001" not in out and not (tmp_path / "base_checkpoints").exists()


def test_standalone_errors_are_one_line(isolated_base_dir, tmp_path, capsys):
    from scripts.base_eval import main
    with pytest.raises(SystemExit) as e:
        run_cli(main, ["--model_tag=d4", f"--output_dir={tmp_path}", "--device_type=cpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--download_bundle" in err
    write_tiny_bundle(isolated_base_dir)
    with pytest.raises(SystemExit):
        run_cli(main, ["--model_tag=d4", f"--output_dir={tmp_path}", "--device_type=cpu"])
    assert "tokenizer not found" in capsys.readouterr().err


# ---------------------------------------------------------------- preparing the bundle

def test_download_bundle_from_a_local_server(tmp_path, capsys):
    served = tmp_path / "served"
    bundle = write_tiny_bundle(tmp_path / "src")
    served.mkdir()
    with zipfile.ZipFile(served / "eval_bundle.zip", "w") as z:
        for folder, _, files in os.walk(bundle):
            for name in files:
                path = os.path.join(folder, name)
                z.write(path, os.path.relpath(path, os.path.dirname(bundle)))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dest = tmp_path / "base" / "eval_bundle"
        download_bundle(str(dest), url=f"http://127.0.0.1:{server.server_port}/eval_bundle.zip", retries=1, log=lambda m: None)
        assert [t.label for t in load_bundle(str(dest))] == ["mc", "schema", "lm"]
        assert os.listdir(tmp_path / "base") == ["eval_bundle"]  # no temp files left
        with pytest.raises(UserError, match="HTTP 404"):
            download_bundle(str(tmp_path / "other"), url=f"http://127.0.0.1:{server.server_port}/nope.zip", retries=1)
    finally:
        server.shutdown()
        server.server_close()


def test_download_offline_is_one_line(isolated_base_dir, capsys):
    from scripts.base_eval import main
    url = f"http://127.0.0.1:{free_port()}/eval_bundle.zip"  # nothing listens there: like having no internet
    with pytest.raises(SystemExit) as e:
        run_cli(main, ["--download_bundle", f"--bundle_url={url}", "--download_retries=1"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "failed after 1 tries" in err and "login node" in err
    assert not os.path.exists(isolated_base_dir / "eval_bundle") and os.listdir(isolated_base_dir) == []


# ---------------------------------------------------------------- distributed

def _dist_worker(rank, world, port, bundle, queue):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = evaluate_core(AlphabetOracle(), CharTokenizer(), torch.device("cpu"), tasks=load_bundle(bundle), log=None)
        queue.put((rank, out["results"], out["core_metric"]))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_split_examples_and_agree(tmp_path):
    import torch.multiprocessing as mp
    bundle = write_tiny_bundle(tmp_path)
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_dist_worker, args=(2, free_port(), bundle, queue), nprocs=2, start_method="spawn")
    got = sorted(queue.get() for _ in range(2))
    for rank, results, core in got:
        assert results == pytest.approx(EXPECTED) and core == pytest.approx(EXPECTED_CORE)
