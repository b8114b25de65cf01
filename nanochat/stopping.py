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
message says so, and what is left, from the `note` given to install()). Not within REPEAT_S of the
first: that is the same Ctrl-C delivered twice (torchrun passes the terminal's Ctrl-C on to workers
that got it already). Never inside `saving()`: a signal there only prints one line, the save finishes
(an interrupted torch.save would leave nothing but tracebacks) and the stop follows.

Exit status (`exit_status`): 128 + the signal for a run that a signal stopped, as a shell reports a
process killed by it (130 for Ctrl-C, 143 for SIGTERM, 138 for SIGUSR1), so a scheduler can tell a
saved stop from a finished run (0). Under torchrun the workers exit 0 either way: torchrun turns any
non-zero worker status into its own failure (status 1 and an error report), so the status could not
carry the signal; there the `Stopped by signal` line and the checkpoint's step tell a stop.
"""

import os
import signal
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from nanochat.common import get_dist_info

REPEAT_S = 1.0  # seconds: a second SIGINT sooner than this is the first one, delivered again


class StopTraining(Exception):
    """Raised at a check point once a stop signal has arrived (on every rank at the same point)."""


class StopSignals:
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self, device=None, distributed=False):
        self.device, self.distributed = device, distributed
        self.signum = None  # the signal this rank received
        self.since = None   # when (time.monotonic)
        self.agreed = None  # the signal every rank stopped for (the largest number, if ranks got different ones)
        self.previous = {}
        self.note = None
        self.in_save = False

    def install(self, note=None):
        """Handle the signals from now on; note() describes, for a stop without saving, what is left."""
        self.note = note
        self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def _handle(self, signum, frame):
        if self.in_save:
            if (self.signum or self.agreed) and get_dist_info()[1] == 0:  # a stop is under way (maybe another rank's)
                # os.write, not print: the handler may run in the middle of a print to the same stream
                os.write(2, f"Signal {signum} during the checkpoint save: the save finishes first, then the run stops\n".encode())
            if self.signum is None:
                self.signum, self.since = signum, time.monotonic()
            return
        if signum == signal.SIGINT and self.signum is not None:
            if time.monotonic() - self.since < REPEAT_S:
                return
            raise KeyboardInterrupt("stopped at once without saving" + (f"; {self.note()}" if self.note else ""))
        self.signum, self.since = signum, time.monotonic()

    @contextmanager
    def saving(self):
        """A checkpoint save: no signal interrupts it (a stop takes effect at the next check point)."""
        self.in_save = True
        try:
            yield
        finally:
            self.in_save = False

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


def exit_status(signum, distributed=False):
    """The process's exit status after training: 128 + the signal that stopped it, else 0 (see above)."""
    return 128 + signum if signum and not distributed else 0
