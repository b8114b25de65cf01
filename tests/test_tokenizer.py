"""Tokenizer: training, special tokens, encode/decode, token_bytes, save/load, and the tok_train CLI."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from nanochat.common import UserError
from nanochat.dataset import wiki_documents, write_shards
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, get_token_bytes, get_tokenizer
from tests.conftest import ROOT

VARIED = [
    "The capital of France is Paris.",
    "Numbers: 3.14159, 1,000,000 and 2025-11-24; version 0.1.0",
    "naïve café, Straße, Ελληνικά, 東京タワー, עברית, emoji 🙂🚀 and a ZWJ 👩‍💻",
    "  leading spaces,\ttabs\t\tand\r\nwindows newlines\n\n\nand trailing   ",
    "",
    " ",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code",
    "<|bos|> written in text <|assistant_end|>",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_from_iterator(wiki_documents(max_chars=300_000), 1024)


def test_split_pattern_groups_digits_in_pairs():
    assert r"\p{N}{1,2}" in SPLIT_PATTERN and r"\p{N}{1,3}" not in SPLIT_PATTERN
    assert len(SPECIAL_TOKENS) == 9 and SPECIAL_TOKENS[0] == "<|bos|>" and SPECIAL_TOKENS[-1] == "<|output_end|>"


def test_train_vocab_and_special_ids(tok):
    assert tok.get_vocab_size() == 1024
    ids = [tok.encode_special(name) for name in SPECIAL_TOKENS]
    assert ids == list(range(1024 - 9, 1024))  # right after the BPE tokens, in order
    assert tok.get_bos_token_id() == ids[0]
    assert tok.get_special_tokens() == SPECIAL_TOKENS
    with pytest.raises(ValueError):
        tok.encode_special("<|nope|>")


@pytest.mark.parametrize("text", VARIED)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) for i in ids)
    assert tok.decode(ids) == text


def test_special_text_is_not_special(tok):
    ids = tok.encode("<|bos|>")
    assert tok.get_bos_token_id() not in ids and len(ids) > 1
    assert tok.decode(ids) == "<|bos|>"


def test_prepend_append_and_batch(tok):
    bos = tok.get_bos_token_id()
    ids = tok("The capital of France is", prepend="<|bos|>")
    assert isinstance(ids, list) and ids[0] == bos and all(isinstance(i, int) for i in ids)
    assert tok.decode(ids[1:]) == "The capital of France is"
    assert tok.decode(ids) == "<|bos|>The capital of France is"
    end = tok.encode_special("<|assistant_end|>")
    assert tok.encode("hi", prepend=bos, append="<|assistant_end|>") == [bos] + tok.encode("hi") + [end]
    batch = tok.encode(VARIED, prepend=bos, num_threads=2)
    assert batch == [[bos] + tok.encode(t) for t in VARIED]
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)
    assert tok.id_to_token(bos) == "<|bos|>"
    with pytest.raises(TypeError):
        tok.encode(42)


def test_small_corpus_reports_real_vocab_size(capsys):
    small = Tokenizer.train_from_iterator(["hello world, hello there"] * 5, 2048)
    assert 265 <= small.get_vocab_size() < 2048
    out = capsys.readouterr().out
    assert f"vocab size {small.get_vocab_size():,} (asked for 2,048" in out
    assert small.encode_special("<|output_end|>") == small.get_vocab_size() - 1
    assert small.decode(small.encode("hello world")) == "hello world"
    assert len(small.token_bytes()) == small.get_vocab_size()
    with pytest.raises(UserError, match="at least 265"):
        Tokenizer.train_from_iterator(["x"], 100)


def test_token_bytes(tok):
    tb = tok.token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (tok.get_vocab_size(),)
    bpe = tok.get_vocab_size() - len(SPECIAL_TOKENS)
    assert tb[:bpe].tolist() == [len(tok.enc.decode_single_token_bytes(i)) for i in range(bpe)]
    assert tb[bpe:].tolist() == [0] * len(SPECIAL_TOKENS)
    assert tb[:256].tolist() == [1] * 256


def test_save_load_round_trip(tok, isolated_base_dir):
    tok.save(str(isolated_base_dir / "tokenizer"))
    assert not [f for f in os.listdir(isolated_base_dir / "tokenizer") if f.endswith(".tmp")]
    loaded = get_tokenizer()
    assert loaded.get_vocab_size() == tok.get_vocab_size()
    assert loaded.mergeable_ranks == tok.mergeable_ranks
    for text in VARIED:
        assert loaded.encode(text, prepend="<|bos|>") == tok.encode(text, prepend="<|bos|>")
    assert torch.equal(get_token_bytes(), tok.token_bytes())


def test_missing_and_corrupt_tokenizer(tok, isolated_base_dir):
    with pytest.raises(UserError, match="tokenizer not found at .*python -m scripts.tok_train"):
        get_tokenizer()
    with pytest.raises(UserError, match="tokenizer not found"):
        get_token_bytes()
    directory = isolated_base_dir / "tokenizer"
    tok.save(str(directory))
    path = directory / "tokenizer.json"
    payload = json.loads(path.read_text())
    for broken in ("{not json", json.dumps({**payload, "mergeable_ranks": [["!!", 0]]}), json.dumps([1, 2])):
        path.write_text(broken)
        with pytest.raises(UserError, match=r"tokenizer\.json is corrupt.*tok_train"):
            get_tokenizer()
    (directory / "token_bytes.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"token_bytes\.pt is corrupt"):
        get_token_bytes()


def _run(module, *args, base):
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base)}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_tok_train_cli_end_to_end(isolated_base_dir):
    docs = [f"Document number {i}: the quick brown fox jumps over the lazy dog {i * 7}." for i in range(400)]
    write_shards(docs, str(isolated_base_dir / "base_data"), docs_per_shard=100, val_docs=40)
    result = _run("scripts.tok_train", "--vocab-size", "600", "--max_chars=1000000", "--doc_cap=200", base=isolated_base_dir)
    assert result.returncode == 0, result.stderr
    assert "Trained tokenizer: vocab size" in result.stdout and "(asked for 600" in result.stdout
    assert "chars/token" in result.stdout and "round trip ok" in result.stdout
    assert "360 docs" in result.stdout  # train shards only: 400 - 40 val docs
    tok = Tokenizer.from_directory(str(isolated_base_dir / "tokenizer"))
    assert tok.decode(tok.encode("the quick brown fox")) == "the quick brown fox"
    assert get_token_bytes().shape == (tok.get_vocab_size(),)


@pytest.mark.parametrize("args, message", [
    (["--bogus=1"], "unknown flag --bogus"),
    (["--vocab_size=lots"], "--vocab_size expects int"),
    ([], "no train shards in .*prepare_data"),
])
def test_tok_train_cli_errors(isolated_base_dir, args, message, cli):
    code, _, err = cli("scripts.tok_train", *args)
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(message, lines[0])


def test_tok_train_range_checks():
    from scripts.tok_train import parse_config

    cfg = parse_config(["--max-chars", "2e9", "--doc_cap=7", "--data_dir", "/x"])
    assert (cfg.max_chars, cfg.doc_cap, cfg.vocab_size, cfg.data_dir) == (2_000_000_000, 7, 65536, "/x")
    for bad in (["--doc_cap=0"], ["--max_chars=-1"]):
        with pytest.raises(UserError, match="is out of range: use >= 1"):
            parse_config(bad)
