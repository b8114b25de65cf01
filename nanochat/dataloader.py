"""Deterministic, resumable packed loader: parquet shards -> BOS-prefixed token stream -> (B, T) batches.

The stream of one rank is: for each epoch, for each of its row groups (every world_size-th of the
epoch's order, starting at its rank, so ranks never share one), for each document, BOS + the document's
tokens. Each batch takes the next B*T+1 tokens of that stream: inputs are the first B*T, targets the last B*T.
The epoch's order is the files' order (data_seed = -1), or with a data_seed >= 0 a permutation of all
row groups drawn from (data_seed, epoch), and each row group's documents permuted by a draw from
(data_seed, epoch, row group): another seed reads other documents first, and every epoch differs.

`ReplayLoader` mixes a second data directory into the training stream (replay of an earlier domain):
each sequence of a batch comes from the replay data with probability `fraction`, decided by a seeded
draw per (rank, sequence number), so the choices are the same for the same seed on any run and
resume exactly from the sequence count in the state.
"""

import bisect
import itertools
import os

import numpy as np
import torch

from nanochat.common import UserError
from nanochat.dataset import PREPARE_HINT, READ_ERRORS, check_shard, damaged, list_shards, open_shard

STATE_KEYS = ("epoch", "shard", "row_group", "doc", "offset")


class DataLoader:
    """Iterate forever over (inputs, targets) LongTensors of shape (B, T) on device.

    state_dict() gives the exact position of the next unconsumed token as plain ints; passing it back as
    state= makes the next batch bit-identical to the one the uninterrupted loader would have produced
    (with the same data_seed: `doc` counts documents in the row group's permuted order).
    A state saved by another rank (or another world size) points at a row group this rank does not own:
    the loader then starts at this rank's next row group after that point (close, but not exact).
    """

    def __init__(self, tokenizer, B, T, split, device, rank=0, world_size=1, data_dir=None, state=None, tokenizer_threads=4,
                 data_seed=-1):
        if B < 1 or T < 1:
            raise UserError(f"batch size and sequence length must be >= 1, got B={B}, T={T}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.tokenizer, self.B, self.T = tokenizer, B, T
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"  # pinned memory only helps (and only exists) for CUDA copies
        self.bos = tokenizer.get_bos_token_id()
        self.threads = tokenizer_threads
        self.paths = list_shards(data_dir, split)
        self.split = split
        # Every row group in global order as (shard, row group); an epoch visits them in order(epoch), of which this
        # rank reads positions rank, rank + world_size, ...
        self.all_row_groups = [(s, g) for s, path in enumerate(self.paths) for g in range(open_shard(path).num_row_groups)]
        self.global_index = {key: i for i, key in enumerate(self.all_row_groups)}
        self.rank, self.world_size, self.data_seed = rank, world_size, data_seed
        self.owned = range(rank, len(self.all_row_groups), world_size)  # positions in an epoch's order
        if not self.owned:
            raise UserError(f"the {split} split has {len(self.all_row_groups)} row groups, fewer than world size {world_size}; "
                            f"rebuild the data with more documents ({PREPARE_HINT})")
        self._orders = {}
        self._open = (None, None)
        first = self.all_row_groups[self.order(0)[rank]]
        self._seek(state or {"epoch": 0, "shard": first[0], "row_group": first[1], "doc": 0, "offset": 0})

    def order(self, epoch):
        """The global row-group indices in the order epoch `epoch` visits them (all ranks share it)."""
        if epoch not in self._orders:
            n = len(self.all_row_groups)
            # one draw per (seed, epoch); the cache keeps two epochs, which is all a state_dict can ask for
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = (np.arange(n) if self.data_seed < 0
                                   else np.random.default_rng([self.data_seed, epoch]).permutation(n))
        return self._orders[epoch]

    def row_groups(self, epoch):
        """This rank's row groups, as (shard, row group), in the order it reads them in epoch `epoch`."""
        return [self._row_group(epoch, pos) for pos in range(len(self.owned))]

    def _row_group(self, epoch, pos):
        """(shard, row group) of this rank's pos-th row group in epoch `epoch`."""
        return self.all_row_groups[self.order(epoch)[self.owned[pos]]]

    def _load(self, pos):
        """Tokenize row group number pos of this rank (in this epoch's order) into one flat tensor plus document
        start offsets. A shard is read whole the first time this process opens it (nanochat.dataset.check_shard):
        damage anywhere in it stops the run then, in one line, not only once (if ever) the run reaches the damaged
        row group."""
        shard, group = self._row_group(self.epoch, pos)
        if self._open[0] != shard:
            self._open = (shard, check_shard(self.paths[shard]))
        pf = self._open[1]
        try:
            texts = pf.read_row_group(group, columns=["text"]).column("text").to_pylist()
        except READ_ERRORS as e:  # changed on disk since the check
            raise damaged(self.paths[shard], group, pf, e) from None
        if self.data_seed >= 0:
            index = self.global_index[(shard, group)]
            texts = [texts[i] for i in np.random.default_rng([self.data_seed, self.epoch, index]).permutation(len(texts))]
        token_lists = self.tokenizer.encode([t or "" for t in texts], prepend=self.bos, num_threads=self.threads)
        lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
        self.doc_starts = np.concatenate([[0], np.cumsum(lengths)])
        flat = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=int(self.doc_starts[-1]))
        self.tokens = torch.from_numpy(flat)
        self.pos, self.cursor = pos, 0

    def _seek(self, state):
        try:
            epoch, shard, group, doc, offset = (int(state[k]) for k in STATE_KEYS)
        except (KeyError, TypeError, ValueError):
            raise UserError(f"data loader state must be a dict with int keys {', '.join(STATE_KEYS)}, got {state!r}") from None
        target = self.global_index.get((shard, group))
        if target is None:
            raise UserError(f"data loader state points at row group {group} of shard {shard}, which the {self.split} data in "
                            f"{os.path.dirname(self.paths[0])} does not have; the data changed since the state was saved")
        self.epoch = epoch
        # where the target stands in this epoch's order, and this rank's first position at or after it
        at = int(np.flatnonzero(self.order(epoch) == target)[0])
        pos = bisect.bisect_left(self.owned, at)
        if pos < len(self.owned) and self.owned[pos] == at:
            self._load(pos)
            if not (0 <= doc < len(self.doc_starts) - 1 and 0 <= offset < self.doc_starts[doc + 1] - self.doc_starts[doc]):
                raise UserError(f"data loader state (doc {doc}, offset {offset}) does not fit shard {shard} row group {group}; "
                                "the data or tokenizer changed since the state was saved")
            self.cursor = int(self.doc_starts[doc] + offset)
        elif pos < len(self.owned):
            self._load(pos)
        else:
            self.epoch += 1
            self._load(0)

    def _next_position(self):
        return (self.epoch, self.pos + 1) if self.pos + 1 < len(self.owned) else (self.epoch + 1, 0)

    def __iter__(self):
        return self

    def __next__(self):
        needed = self.B * self.T + 1
        pieces = []
        while needed:
            if self.cursor == len(self.tokens):
                self.epoch, pos = self._next_position()
                self._load(pos)
                continue
            take = min(needed, len(self.tokens) - self.cursor)
            pieces.append(self.tokens[self.cursor:self.cursor + take])
            self.cursor += take
            needed -= take
        window = torch.cat(pieces)
        if self.pin:
            window = window.pin_memory()
        inputs = window[:-1].view(self.B, self.T).to(self.device, non_blocking=self.pin)
        targets = window[1:].view(self.B, self.T).to(self.device, non_blocking=self.pin)
        return inputs, targets

    def state_dict(self):
        """Position of the next unconsumed token, as plain ints (safe for torch.load(weights_only=True))."""
        if self.cursor == len(self.tokens):
            epoch, pos = self._next_position()
            doc = offset = 0
        else:
            epoch, pos = self.epoch, self.pos
            doc = int(np.searchsorted(self.doc_starts, self.cursor, side="right")) - 1
            offset = self.cursor - int(self.doc_starts[doc])
        shard, group = self._row_group(epoch, pos)
        return {"epoch": epoch, "shard": shard, "row_group": group, "doc": doc, "offset": offset}


REPLAY_STATE_KEYS = ("main", "replay", "sequences", "replayed")


class ReplayLoader:
    """Iterate forever over (inputs, targets) of shape (B, T), each row a sequence of T+1 tokens taken
    from the main stream or, with probability `fraction`, from the replay stream.

    Both streams are this rank's own packed streams (DataLoader with one row: each sequence takes the
    next T+1 tokens of its stream; ranks own disjoint row groups of both directories; both in the order
    of `data_seed`). Sequence number
    i of rank r is a replay sequence when a uniform draw seeded by (seed, r, i) is below `fraction`:
    deterministic, independent of the batch size and of how the sequences are split into micro-batches.
    state_dict() holds both streams' positions and the sequence count, so a resumed loader continues
    bit-identically.
    """

    def __init__(self, tokenizer, B, T, device, data_dir, replay_dir, fraction, seed, rank=0, world_size=1, state=None,
                 tokenizer_threads=4, data_seed=-1):
        if not 0 < fraction < 1:
            raise UserError(f"replay fraction must lie in (0, 1), got {fraction}")
        if state is not None and (not isinstance(state, dict) or set(state) != set(REPLAY_STATE_KEYS)):
            raise UserError(f"replay loader state must be a dict with keys {', '.join(REPLAY_STATE_KEYS)}, got {state!r}; "
                            f"was the checkpoint written without replay?")
        state = state or {"main": None, "replay": None, "sequences": 0, "replayed": 0}
        self.B, self.fraction, self.rank = B, fraction, rank
        self.seed = seed % 2**64  # the draw's seed must be non-negative; torch seeds may be negative
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.main = DataLoader(tokenizer, 1, T, "train", "cpu", rank, world_size, data_dir, state["main"], tokenizer_threads,
                               data_seed)
        self.replay = DataLoader(tokenizer, 1, T, "train", "cpu", rank, world_size, replay_dir, state["replay"],
                                 tokenizer_threads, data_seed)
        self.sequences, self.replayed = int(state["sequences"]), int(state["replayed"])

    def is_replay(self, i):
        """Whether sequence number i of this rank comes from the replay stream (a pure function of seed, rank, i)."""
        return np.random.default_rng([self.seed, self.rank, i]).random() < self.fraction

    def __iter__(self):
        return self

    def __next__(self):
        rows = []
        for _ in range(self.B):
            replay = self.is_replay(self.sequences)
            rows.append(next(self.replay if replay else self.main))
            self.sequences += 1
            self.replayed += replay
        inputs, targets = (torch.cat([r[j] for r in rows]) for j in (0, 1))
        if self.pin:
            inputs, targets = inputs.pin_memory(), targets.pin_memory()
        return inputs.to(self.device, non_blocking=self.pin), targets.to(self.device, non_blocking=self.pin)

    def state_dict(self):
        return {"main": self.main.state_dict(), "replay": self.replay.state_dict(), "sequences": self.sequences,
                "replayed": self.replayed}
