"""Build the parquet shards (train_XXXXX.parquet + val_00000.parquet) that tokenizer training and pretraining read.

    python -m scripts.prepare_data                                   # offline corpus: wiki + shakespeare
    python -m scripts.prepare_data --domains=wiki --data_dir=DIR     # one domain (e.g. for a forgetting experiment)
    python -m scripts.prepare_data --source=files --files a.txt b.jsonl c.parquet
    python -m scripts.prepare_data --source=hf_disk --dataset_path=DIR
    python -m scripts.prepare_data --source=fineweb --num_shards=8   # needs internet (login node)
"""

import argparse
import os
import time

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


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)  # run_cli turns it into one line on stderr and exit status 2


def parse_args(argv):
    p = _Parser(prog="python -m scripts.prepare_data", description=__doc__.split("\n")[0], allow_abbrev=False,
                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 1)[1])
    p.add_argument("--source", choices=list(SOURCE_FLAGS), default="offline", help="where the text comes from (default: offline)")
    p.add_argument("--data_dir", "--data-dir", default=None, help="output directory (default: <base>/base_data)")
    p.add_argument("--domains", default=None, help=f"offline: comma-separated domains (default: {','.join(DOMAINS)})")
    p.add_argument("--max_chars_per_domain", "--max-chars-per-domain", type=int, default=None, help="offline: cap each domain's characters")
    p.add_argument("--files", nargs="+", default=None, help="files: .txt, .jsonl (field 'text') or .parquet (column 'text')")
    p.add_argument("--txt_split", "--txt-split", choices=["file", "paragraphs"], default=None,
                   help="files: a .txt file is one document ('file', default) or one per blank-line-separated paragraph")
    p.add_argument("--dataset_path", "--dataset-path", default=None, help="hf_disk: directory written by Dataset.save_to_disk")
    p.add_argument("--hf_split", "--hf-split", default=None, help="hf_disk: split of a saved DatasetDict (default: train)")
    p.add_argument("--num_shards", "--num-shards", type=int, default=None, help="fineweb: train shards to download (default: 8, max 1822)")
    p.add_argument("--retries", type=int, default=None, help="fineweb: tries per shard (default: 5)")
    p.add_argument("--workers", type=int, default=None, help="fineweb: parallel downloads (default: 4)")
    p.add_argument("--docs_per_shard", "--docs-per-shard", type=int, default=None, help="documents per train shard (default: 2000)")
    p.add_argument("--val_docs", "--val-docs", type=int, default=None, help="documents in the val shard (default: 5%% of all)")
    p.add_argument("--val_fraction", "--val-fraction", type=float, default=None, help="fraction of documents for val (default: 0.05)")
    p.add_argument("--seed", type=int, default=None, help="shuffle seed that also fixes the val documents (default: 42)")
    args = p.parse_args(argv)
    given = {k for k, v in vars(args).items() if v is not None} - {"source", "data_dir"}
    allowed = SOURCE_FLAGS[args.source] | (SHARD_FLAGS if args.source != "fineweb" else set())
    if given - allowed:
        raise UserError(f"--{sorted(given - allowed)[0]} does not apply to --source={args.source}")
    if args.val_docs is not None and args.val_fraction is not None:
        raise UserError("give --val_docs or --val_fraction, not both")
    if args.val_fraction is not None and not 0 < args.val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {args.val_fraction}")
    for name in ("max_chars_per_domain", "num_shards", "retries", "workers", "docs_per_shard", "val_docs"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UserError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.source == "files" and not args.files:
        raise UserError("--source=files needs --files PATH [PATH ...]")
    if args.source == "hf_disk" and not args.dataset_path:
        raise UserError("--source=hf_disk needs --dataset_path=DIR")
    return args


def main(argv):
    args = parse_args(argv)
    data_dir = get_data_dir(args.data_dir)
    t0 = time.time()
    if args.source == "fineweb":
        manifest = download_fineweb(args.num_shards or 8, data_dir, retries=args.retries or 5, workers=args.workers or 4)
        print(f"FineWeb-Edu: {manifest['train']['shards']} train shards ({manifest['train']['docs']:,} docs) and the val shard "
              f"({manifest['val']['docs']:,} docs) in {os.path.abspath(data_dir)} [{time.time() - t0:.1f}s]")
        return
    if args.source == "offline":
        domains = [d.strip() for d in (args.domains or ",".join(DOMAINS)).split(",") if d.strip()]
        docs = offline_documents(domains, args.max_chars_per_domain)
        source, licence = f"offline:{','.join(domains)}", "; ".join(LICENCES[d] for d in domains if d in LICENCES)
    elif args.source == "files":
        docs = file_documents(args.files, args.txt_split or "file")
        source, licence = "files", "the user's own files"
        print(f"Reading {len(args.files)} files")
    else:
        docs = hf_disk_documents(args.dataset_path, args.hf_split or "train")
        source, licence = f"hf_disk:{os.path.abspath(args.dataset_path)}", "see the dataset's own card"
    manifest = write_shards(docs, data_dir, docs_per_shard=args.docs_per_shard or 2000, val_docs=args.val_docs,
                            val_fraction=args.val_fraction or 0.05, seed=42 if args.seed is None else args.seed,
                            source=source, licence=licence)
    train, val = manifest["train"], manifest["val"]
    print(f"Source: {source} ({licence})")
    print(f"Wrote {train['shards']} train shards ({train['docs']:,} docs, {train['chars']:,} chars) and 1 val shard "
          f"({val['docs']:,} docs, {val['chars']:,} chars) to {os.path.abspath(data_dir)} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    run_cli(main)
