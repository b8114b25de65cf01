"""Where a method plugs into the training loop (nanochat/train.py) without forking it.

A `TrainHook` may swap layers before the optimizers exist, and runs once per update after the
gradients are final and before the optimizer step (where the adaptive-SVD analysis happens). Its
`state_dict()` travels in the checkpoint (key "hook") and comes back through `load_state_dict` on
--resume. `Run` is what a hook may use of the live run.
"""

from dataclasses import dataclass

import torch

from nanochat.run_files import RunFolder
from nanochat.stopping import StopSignals


class TrainHook:
    """No-op hook: the plain baseline. Subclasses add a method to the same loop."""
    name = "baseline"

    def prepare_model(self, model):
        """Called after init, before the optimizers exist: swap layers here."""

    def attach(self, run):
        """Called once the optimizers, output directory and logger exist."""

    def after_backward(self, step, last_step):
        """Called for update number `step` (1-based) with final, reduced, clipped gradients."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        """Restore what state_dict returned, after the dense weights and before optimizer state."""

    def summary(self):
        return {}


@dataclass
class Run:
    """What a hook may use of the live run."""
    cfg: object  # the run's config (nanochat.train.TrainConfig or a subclass)
    model: torch.nn.Module
    muon: object
    adamw: object
    device: torch.device
    ckpt_dir: str
    log: object  # log(dict, step) -> wandb when enabled
    rank: int
    world_size: int
    stop: StopSignals = None
    folder: RunFolder = None

    def jsonl(self, name):
        """The run's metrics file `name` (next to the checkpoint): call `.write(record)` on any rank, rank 0
        writes. Each record needs an int "step" (and "layer" for per-layer records): on --resume the rows
        after the checkpoint's step are dropped, so a row is never logged twice. Nothing is opened or
        truncated before training really starts."""
        if self.folder is None:
            self.folder = RunFolder(self.ckpt_dir, self.rank)
        return self.folder.jsonl(name)

    def stop_requested(self):
        """This rank got a stop signal (no communication): skip the rest of this rank's own work, then
        call stop_check() at a point every rank reaches."""
        return self.stop is not None and self.stop.requested()

    def stop_check(self):
        """Raise nanochat.stopping.StopTraining (on every rank together) once a stop signal has arrived; the
        loop then saves the last completed step. Call it the same number of times on every rank; change
        nothing before it that the checkpoint of that step must not see."""
        if self.stop is not None:
            self.stop.check()
