"""Train the BPE tokenizer on the train shards (never the val shard) and save it to <base>/tokenizer.

    python -m scripts.tok_train [--max_chars=2000000000] [--doc_cap=10000] [--vocab_size=65536] [--data_dir=DIR]
"""

import dataclasses
import os
import time

import pyarrow.parquet as pq

from nanochat.cli import at_least, flag, parse_args
from nanochat.common import UserError, run_cli
from nanochat.dataset import get_data_dir, list_shards
from nanochat.tokenizer import MIN_VOCAB_SIZE, Tokenizer, get_tokenizer_dir

SAMPLE_TEXT = "Hello world! The year 2025 has 365 days; naïve café, 東京, emoji 🙂.\n\n\tdef f(x):\n        return x ** 2"


@dataclasses.dataclass
class TokTrainConfig:
    max_chars: int = flag(2_000_000_000, "stop reading the train shards after this many characters", at_least(1))
    doc_cap: int = flag(10_000, "use at most this many characters of each document", at_least(1))
    vocab_size: int = flag(65536, "vocabulary size including the 9 special tokens (a small corpus may give fewer)",
                           at_least(MIN_VOCAB_SIZE))
    data_dir: str = flag("", "shard directory; empty = <base>/base_data")


def parse_config(argv):
    return parse_args(TokTrainConfig, argv, prog="python -m scripts.tok_train", description=__doc__)


def text_iterator(paths, max_chars, doc_cap, stats):
    """Documents of the given shards, each cut to doc_cap chars, until max_chars; counts go into stats."""
    for i, path in enumerate(paths):
        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            for text in pf.read_row_group(g, columns=["text"]).column("text").to_pylist():
                text = (text or "")[:doc_cap]
                stats["docs"] += 1
                stats["chars"] += len(text)
                yield text
                if stats["chars"] >= max_chars:
                    return
        print(f"  read shard {i + 1}/{len(paths)}: {stats['chars']:,} chars so far", flush=True)


def compression_summary(tokenizer, data_dir):
    """Chars and bytes per token on (up to 1M chars of) the val shard, and a round trip of a fixed sample."""
    try:
        val_path = list_shards(data_dir, "val")[0]
        texts, chars = [], 0
        for text in pq.read_table(val_path, columns=["text"]).column("text").to_pylist():
            texts.append(text or "")
            chars += len(texts[-1])
            if chars >= 1_000_000:
                break
        tokens = sum(map(len, tokenizer.encode(texts)))
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        print(f"Compression on {len(texts):,} val docs: {chars / tokens:.2f} chars/token, {nbytes / tokens:.2f} bytes/token")
    except UserError:
        print("No val shard: skipping the compression check on held-out text")
    ids = tokenizer.encode(SAMPLE_TEXT)
    ok = tokenizer.decode(ids) == SAMPLE_TEXT
    print(f"Sample text: {len(SAMPLE_TEXT)} chars -> {len(ids)} tokens, round trip {'ok' if ok else 'FAILED'}")
    if not ok:
        raise UserError("the trained tokenizer does not round-trip text; please report this")


def main(argv):
    args = parse_config(argv)
    data_dir = get_data_dir(args.data_dir or None)
    paths = list_shards(data_dir, "train")
    print(f"Training a tokenizer with vocab size {args.vocab_size:,} on up to {args.max_chars:,} chars "
          f"of {len(paths)} train shards in {data_dir}", flush=True)
    stats = {"docs": 0, "chars": 0}
    t0 = time.time()
    tokenizer = Tokenizer.train_from_iterator(text_iterator(paths, args.max_chars, args.doc_cap, stats), args.vocab_size)
    print(f"Trained on {stats['docs']:,} docs, {stats['chars']:,} chars in {time.time() - t0:.2f}s")
    out_dir = get_tokenizer_dir()
    tokenizer.save(out_dir)
    print(f"Saved tokenizer.json and token_bytes.pt to {os.path.abspath(out_dir)}")
    compression_summary(tokenizer, data_dir)


if __name__ == "__main__":
    run_cli(main)
