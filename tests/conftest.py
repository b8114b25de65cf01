"""Test isolation: every test gets its own NANOCHAT_BASE_DIR, so nothing touches ~/.cache/nanochat."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


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
