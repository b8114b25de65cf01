"""Shared test setup: every test gets its own NANOCHAT_BASE_DIR, so nothing touches ~/.cache/nanochat.

Fixtures: `isolated_base_dir` (automatic), `prepared_base` (real data + tokenizer, once per session),
`base` (a test runs on `prepared_base`) and `cli` (an entry point's command line in this process). Helpers for test modules (`from tests.conftest import ...`):
`ROOT`, `free_port()`, `tiny_model(...)`, `perturb_zero_inits(model)`, `StopAt(step)` (a train hook that sends
SIGUSR1 during that step). Opt-in fixtures: `one_thread` (torch on one thread for the test) and `domains`
(two one-domain data folders, wiki and shakespeare, once per session).

Markers: `slow` and `slurm` tests are deselected by default (pyproject.toml). No test carries both and
every test that uses the `slurm` fixture (a real SLURM cluster: apt-get and daemons) is marked `slurm`,
so the default run, `-m slow` and `-m slurm` together run every test exactly once, and only `-m slurm`
installs packages or starts daemons.
"""

import importlib
import os
import signal
import socket
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from nanochat.dataset import offline_documents, write_shards  # noqa: E402 (after the path above)
from nanochat.hooks import TrainHook  # noqa: E402


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (for a rendezvous or a local server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(depth=2, vocab=256, seq=32, seed=0):
    """A freshly initialised GPT on CPU, built on the meta device first as the training loop does."""
    from nanochat.gpt import GPT, GPTConfig

    torch.manual_seed(seed)
    with torch.device("meta"):
        model = GPT(GPTConfig.from_depth(depth, vocab, seq))
    model.to_empty(device="cpu")
    model.init_weights()
    return model


def perturb_zero_inits(model, std=0.05, seed=1):
    """The zero-initialised projections make every output trivial; give them random weights for tests."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.hookimpl(tryfirst=True)  # before -m deselects anything
def pytest_collection_modifyitems(items):
    for item in items:
        marks = {m.name for m in item.iter_markers()}
        if "slurm" in getattr(item, "fixturenames", ()) and "slurm" not in marks:
            raise pytest.UsageError(f"{item.nodeid} uses the slurm fixture: mark it @pytest.mark.slurm")
        if {"slow", "slurm"} <= marks:
            raise pytest.UsageError(f"{item.nodeid} is marked slow and slurm: -m slow would start SLURM; keep only slurm")


@pytest.fixture
def cli(capsys, monkeypatch):
    """cli(module, *args, cwd=None) -> (exit status, stdout, stderr): an entry point's command line run in this
    process, through the same run_cli wrapper (one-line errors, exit status 2), without a Python start-up.
    A few tests still start real processes to show the same from outside."""
    from nanochat.common import run_cli

    def run(module, *args, cwd=None):
        monkeypatch.chdir(cwd or ROOT)
        code = 0
        try:
            run_cli(importlib.import_module(module).main, list(args))
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err
    return run


@pytest.fixture(autouse=True)
def isolated_base_dir(tmp_path, monkeypatch):
    base = tmp_path / "nanochat_base"
    base.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    return base


@pytest.fixture(scope="session")
def prepared_base(tmp_path_factory):
    """A base dir with real offline data and a trained tokenizer, built once per test session (~1 s).

    Layout matches the defaults, so pointing NANOCHAT_BASE_DIR at it is enough:
      base_data/  the offline corpus capped at 750,000 chars per domain (wiki, shakespeare), so ~1.5M chars:
                  4 train shards of up to 500 docs (~1,700 docs, ~1.43M chars) and a val shard (5%, ~90 docs)
      tokenizer/  BPE with vocab_size=4096 trained on the train shards, plus token_bytes.pt
    Shared by the whole session: treat it as read-only.
    """
    return build_prepared_base(tmp_path_factory.mktemp("prepared_base"))


def build_prepared_base(base):
    """Write the prepared_base layout into the (existing, empty) directory `base`; returns it."""
    import pyarrow.parquet as pq

    from nanochat.dataset import list_shards, offline_documents, write_shards
    from nanochat.tokenizer import Tokenizer

    data_dir = str(base / "base_data")
    write_shards(offline_documents(max_chars_per_domain=750_000), data_dir, docs_per_shard=500, seed=42, source="offline:test")
    texts = (t for path in list_shards(data_dir, "train") for t in pq.read_table(path).column("text").to_pylist())
    Tokenizer.train_from_iterator(texts, 4096).save(str(base / "tokenizer"))
    return base


@pytest.fixture
def base(prepared_base, monkeypatch):
    """The test runs on `prepared_base` (read-only); child processes it starts use one thread each."""
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(prepared_base))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return prepared_base


class StopAt(TrainHook):
    """Sends SIGUSR1 (what SLURM sends before the time limit) to this process during step `at`: the run saves
    the step and stops."""

    def __init__(self, at):
        self.at = at

    def after_backward(self, step, last_step):
        if step == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.fixture
def one_thread():
    """For tests of tiny matrices: one thread avoids thread hand-off stalls on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def domains(tmp_path_factory):
    """Two data folders of one domain each (the offline corpus' wiki and shakespeare parts)."""
    root = tmp_path_factory.mktemp("domains")
    dirs = {}
    for domain in ("wiki", "shakespeare"):
        dirs[domain] = str(root / domain)
        write_shards(offline_documents([domain], max_chars_per_domain=150_000), dirs[domain], docs_per_shard=200, seed=1)
    return dirs


def failing_svd(*args, **kwargs):
    """A stand-in for torch.linalg.svd that fails as a non-converging driver does: every SVD kernel, on
    whichever path (the batched analysis, the reference, its retries), fails."""
    raise torch.linalg.LinAlgError("injected failure")
