"""Prompt, agreed stops: SIGTERM, SIGUSR1 (SLURM's warning before the time limit) and SIGINT (Ctrl-C).

A signal only sets a flag. Check points turn it into `StopTraining`: the training loop checks before
every micro-batch, validation before every batch, CORE evaluation between examples and the adaptive-SVD
analysis between layers. The loop then abandons the partial step, evaluation or analysis and saves the
last completed step, so a stop takes effect within about one micro-batch (or one layer's SVD).

Under torchrun every rank must stop at the same check point, or one would wait forever in a collective:
- `check()` all-reduces the flag (so one rank's signal stops all ranks) and raises on every rank
  together. It must be called the same number of times on every rank.
- `requested()` is this rank's own flag, no communication. Where ranks do different amounts of work
  (the layers or examples each rank owns), use it to skip the rest of that work, then meet at a
  `check()` that every rank reaches once.
A second SIGINT while a stop is pending raises KeyboardInterrupt at once: stop without saving (its
message says so, and what is left, from the `note` given to install()).
"""

import signal

import torch
import torch.distributed as dist


class StopTraining(Exception):
    """Raised at a check point once a stop signal has arrived (on every rank at the same point)."""


class StopSignals:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, device=None, distributed=False):
        self.device, self.distributed = device, distributed
        self.signum = None  # the signal this rank received
        self.agreed = None  # the signal every rank stopped for (the largest number, if ranks got different ones)
        self.previous = {}
        self.note = None

    def install(self, note=None):
        """Handle the signals from now on; note() describes, for a stop without saving, what is left."""
        self.note = note
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt("stopped at once without saving" + (f"; {self.note()}" if self.note else ""))
        self.signum = signum

    def requested(self):
        return self.signum is not None

    def check(self):
        value = self.signum or 0
        if self.distributed:
            flag = torch.tensor(value, device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            value = int(flag.item())
        if value:
            self.agreed = value
            raise StopTraining(value)
