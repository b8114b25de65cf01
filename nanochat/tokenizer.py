"""BPE tokenizer: trained with rustbpe, run through tiktoken, saved as JSON (no pickle) plus token_bytes.pt.

Layout of a saved tokenizer directory (default `<base>/tokenizer/`):
  tokenizer.json  - {"format", "pattern", "special_tokens": {name: id}, "mergeable_ranks": [[base64 bytes, rank], ...]}
  token_bytes.pt  - int32 tensor, token_bytes[i] = UTF-8 byte length of token i (0 for special tokens),
                    used to turn per-token losses into bits per byte.
"""

import base64
import json
import os

import rustbpe
import tiktoken
import torch

from nanochat.common import UserError, get_base_dir, print0

SPECIAL_TOKENS = [
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
]

# GPT-4's split regex, except numbers are chunked by 1-2 digits (not 1-3): fewer number tokens,
# which leaves more of a small vocabulary for words.
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""

TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.pt"
FORMAT = "nanochat-bpe-v1"
TRAIN_HINT = "train it with: python -m scripts.tok_train"
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def _build_encoding(mergeable_ranks, pattern):
    # Specials go right after the BPE tokens, so ids are dense: 0..n_bpe-1 BPE, then the 9 specials.
    if sorted(mergeable_ranks.values()) != list(range(len(mergeable_ranks))):
        raise ValueError("BPE ranks are not the dense range 0..n-1")
    offset = len(mergeable_ranks)
    special = {name: offset + i for i, name in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name="nanochat", pat_str=pattern, mergeable_ranks=mergeable_ranks, special_tokens=special)


class Tokenizer:
    """A tiktoken Encoding with nanochat's special tokens and encode/decode conveniences."""

    def __init__(self, mergeable_ranks, pattern=SPLIT_PATTERN):
        self.mergeable_ranks = mergeable_ranks
        self.pattern = pattern
        self.enc = _build_encoding(mergeable_ranks, pattern)
        self.special_ids = {name: self.enc.encode_single_token(name) for name in SPECIAL_TOKENS}
        self.bos_token_id = self.special_ids["<|bos|>"]

    @classmethod
    def train_from_iterator(cls, text_iter, vocab_size):
        """Train BPE on an iterator of strings; vocab_size counts the 9 special tokens.

        A small corpus can run out of pairs to merge before reaching vocab_size: the smaller vocabulary
        is kept (the model must be sized from get_vocab_size(), not from the request). Both are printed.
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise UserError(f"vocab_size must be at least {MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(text_iter, vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        tokenizer = cls(ranks, trainer.get_pattern())
        short = "; the corpus ran out of merges, use the real size" if tokenizer.get_vocab_size() < vocab_size else ""
        print0(f"Trained tokenizer: vocab size {tokenizer.get_vocab_size():,} (asked for {vocab_size:,}{short})")
        return tokenizer

    def save(self, directory):
        """Write tokenizer.json and token_bytes.pt into directory (each atomically)."""
        os.makedirs(directory, exist_ok=True)
        payload = {
            "format": FORMAT,
            "pattern": self.pattern,
            "special_tokens": self.special_ids,
            "mergeable_ranks": [[base64.b64encode(token).decode("ascii"), rank]
                                for token, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])],
        }
        path = os.path.join(directory, TOKENIZER_FILE)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(payload, f)
        os.replace(path + ".tmp", path)
        path = os.path.join(directory, TOKEN_BYTES_FILE)
        torch.save(self.token_bytes(), path + ".tmp")
        os.replace(path + ".tmp", path)

    @classmethod
    def from_directory(cls, directory):
        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise UserError(f"tokenizer not found at {path}; {TRAIN_HINT}")
        try:
            with open(path, encoding="utf-8") as f:
                payload = json.load(f)
            if payload.get("format") != FORMAT:
                raise ValueError(f"unknown format {payload.get('format')!r}")
            ranks = {base64.b64decode(token, validate=True): int(rank) for token, rank in payload["mergeable_ranks"]}
            tokenizer = cls(ranks, payload["pattern"])
            if payload["special_tokens"] != tokenizer.special_ids:
                raise ValueError("special token ids do not match")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise UserError(f"tokenizer file {path} is corrupt ({e}); delete it and retrain: python -m scripts.tok_train") from None
        return tokenizer

    def token_bytes(self):
        """int32 tensor of each token's UTF-8 byte length, 0 for special tokens."""
        lengths = torch.zeros(self.get_vocab_size(), dtype=torch.int32)
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)
        return lengths

    def get_vocab_size(self):
        return self.enc.n_vocab

    def get_bos_token_id(self):
        return self.bos_token_id

    def get_special_tokens(self):
        return list(SPECIAL_TOKENS)

    def encode_special(self, name):
        if name not in self.special_ids:
            raise ValueError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}")
        return self.special_ids[name]

    def id_to_token(self, token_id):
        return self.enc.decode([token_id])

    def _resolve(self, token):
        return self.encode_special(token) if isinstance(token, str) else token

    def encode(self, text, prepend=None, append=None, num_threads=8):
        """Encode a string to a list of ids, or a list of strings to a list of lists (in parallel).

        Special-token text inside `text` is encoded as ordinary text, never as the special token;
        prepend/append (a special token name or an id) are the way to add specials.
        """
        prepend_id = None if prepend is None else self._resolve(prepend)
        append_id = None if append is None else self._resolve(append)
        if isinstance(text, str):
            batch = [self.enc.encode_ordinary(text)]
        elif isinstance(text, list):
            batch = self.enc.encode_ordinary_batch(text, num_threads=num_threads)
        else:
            raise TypeError(f"encode expects a str or a list of str, got {type(text).__name__}")
        for ids in batch:
            if prepend_id is not None:
                ids.insert(0, prepend_id)
            if append_id is not None:
                ids.append(append_id)
        return batch[0] if isinstance(text, str) else batch

    __call__ = encode

    def decode(self, ids):
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.enc.decode(ids)


def get_tokenizer_dir():
    return os.path.join(get_base_dir(), "tokenizer")


def get_tokenizer():
    return Tokenizer.from_directory(get_tokenizer_dir())


def get_token_bytes(device="cpu"):
    path = os.path.join(get_tokenizer_dir(), TOKEN_BYTES_FILE)
    if not os.path.isfile(path):
        raise UserError(f"tokenizer not found at {path}; {TRAIN_HINT}")
    try:
        token_bytes = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(token_bytes, torch.Tensor) or token_bytes.dim() != 1:
            raise ValueError("not a 1-D tensor")
    except Exception as e:  # torch.load raises many unrelated types on a damaged file
        raise UserError(f"token bytes file {path} is corrupt ({e}); delete it and retrain: python -m scripts.tok_train") from None
    return token_bytes.to(device)
