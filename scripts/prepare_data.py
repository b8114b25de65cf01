"""Build the parquet shards (train_XXXXX.parquet + val_00000.parquet) that tokenizer training and pretraining read.

    python -m scripts.prepare_data                                   # offline corpus: wiki + shakespeare
    python -m scripts.prepare_data --domains=wiki --data_dir=DIR     # one domain (e.g. for a forgetting experiment)
    python -m scripts.prepare_data --source=files --files a.txt b.jsonl c.parquet
    python -m scripts.prepare_data --source=hf_disk --dataset_path=DIR
    python -m scripts.prepare_data --source=fineweb --num_shards=8   # needs internet (login node)
"""

import dataclasses
import os
import time

from nanochat.cli import at_least, between, flag, one_of, parse_flags
from nanochat.common import UserError, run_cli
from nanochat.dataset import (DOMAINS, LICENCES, download_fineweb, file_documents, get_data_dir, hf_disk_documents,
                              offline_documents, write_shards)

SOURCE_FLAGS = {  # flags that only make sense for one source, so a misplaced one is an error, not silently ignored
    "offline": {"domains", "max_chars_per_domain"},
    "files": {"files", "txt_split"},
    "hf_disk": {"dataset_path", "hf_split"},
    "fineweb": {"num_shards", "retries", "workers"},
}
SHARD_FLAGS = {"docs_per_shard", "val_docs", "val_fraction", "seed"}  # the shard writer's, unused by fineweb


@dataclasses.dataclass
class PrepareConfig:
    source: str = flag("offline", "where the text comes from", one_of(*SOURCE_FLAGS))
    data_dir: str = flag("", "output directory; empty = <base>/base_data")
    domains: str = flag(",".join(DOMAINS), "offline: comma-separated domains")
    max_chars_per_domain: int = flag(0, "offline: cap each domain's characters; 0 = no cap", at_least(0))
    files: list[str] = flag([], "files: .txt, .jsonl (field 'text') or .parquet (column 'text')")
    txt_split: str = flag("file", "files: a .txt file is one document, or one per blank-line-separated paragraph",
                          one_of("file", "paragraphs"))
    dataset_path: str = flag("", "hf_disk: directory written by Dataset.save_to_disk")
    hf_split: str = flag("train", "hf_disk: split of a saved DatasetDict")
    num_shards: int = flag(8, "fineweb: train shards to download", between(1, 1822))
    retries: int = flag(5, "fineweb: tries per shard", at_least(1))
    workers: int = flag(4, "fineweb: parallel downloads", at_least(1))
    docs_per_shard: int = flag(2000, "documents per train shard", at_least(1))
    val_docs: int = flag(0, "documents in the val shard; 0 = --val_fraction of all", at_least(0))
    val_fraction: float = flag(0.05, "fraction of documents for val", between(0, 1, open_lo=True, open_hi=True))
    seed: int = flag(42, "shuffle seed that also fixes the val documents")


def parse_args(argv):
    given = parse_flags(PrepareConfig, argv, prog="python -m scripts.prepare_data", description=__doc__)
    cfg = PrepareConfig(**given)
    allowed = SOURCE_FLAGS[cfg.source] | (SHARD_FLAGS if cfg.source != "fineweb" else set())
    misplaced = sorted(set(given) - {"source", "data_dir"} - allowed)
    if misplaced:
        raise UserError(f"--{misplaced[0]} does not apply to --source={cfg.source}")
    if "val_docs" in given and "val_fraction" in given:
        raise UserError("give --val_docs or --val_fraction, not both")
    if cfg.source == "files" and not cfg.files:
        raise UserError("--source=files needs --files PATH [PATH ...]")
    if cfg.source == "hf_disk" and not cfg.dataset_path:
        raise UserError("--source=hf_disk needs --dataset_path=DIR")
    return cfg


def main(argv):
    args = parse_args(argv)
    data_dir = get_data_dir(args.data_dir)
    t0 = time.time()
    if args.source == "fineweb":
        manifest = download_fineweb(args.num_shards, data_dir, retries=args.retries, workers=args.workers)
        print(f"FineWeb-Edu: {manifest['train']['shards']} train shards ({manifest['train']['docs']:,} docs) and the val shard "
              f"({manifest['val']['docs']:,} docs) in {os.path.abspath(data_dir)} [{time.time() - t0:.1f}s]")
        return
    if args.source == "offline":
        domains = [d.strip() for d in args.domains.split(",") if d.strip()]
        docs = offline_documents(domains, args.max_chars_per_domain or None)
        source, licence = f"offline:{','.join(domains)}", "; ".join(LICENCES[d] for d in domains if d in LICENCES)
    elif args.source == "files":
        docs = file_documents(args.files, args.txt_split)
        source, licence = "files", "the user's own files"
        print(f"Reading {len(args.files)} files")
    else:
        docs = hf_disk_documents(args.dataset_path, args.hf_split)
        source, licence = f"hf_disk:{os.path.abspath(args.dataset_path)}", "see the dataset's own card"
    manifest = write_shards(docs, data_dir, docs_per_shard=args.docs_per_shard, val_docs=args.val_docs or None,
                            val_fraction=args.val_fraction, seed=args.seed,
                            source=source, licence=licence)
    train, val = manifest["train"], manifest["val"]
    print(f"Source: {source} ({licence})")
    print(f"Wrote {train['shards']} train shards ({train['docs']:,} docs, {train['chars']:,} chars) and 1 val shard "
          f"({val['docs']:,} docs, {val['chars']:,} chars) to {os.path.abspath(data_dir)} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    run_cli(main)
