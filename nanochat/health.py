"""Training health: a run that has diverged or collapsed stops in one line, before it saves or reports
anything as trained.

Checked once per step, on the step's loss (mean over micro-batches and ranks, so every rank decides
alike) and its global gradient norm, after the backward pass and before the optimizer step, so the
weights of the last completed step are never touched by a broken update:
- diverged: the loss or the gradient norm is NaN or infinite;
- no gradient: the gradient norm is at most DEAD_GRAD_NORM for DEAD_GRAD_STEPS steps in a row. A
  trained model whose every output unit has saturated (e.g. `--matrix_lr=1e6`, or `--unembedding_lr=1e20`)
  gets exactly 0 from then on; a healthy run's norm is many orders of magnitude larger;
- not learning: the loss stays at or above the untrained model's, ln(vocab) - STALL_MARGIN, for
  STALL_STEPS steps in a row after warm-up (the LR warm-up, and at least STALL_STEPS steps). The
  zero-initialised lm_head makes the first loss exactly ln(vocab); a healthy run is below it within a
  few steps, a dead one sits at it (uniform predictions) or above it.
While a no-gradient streak runs, `save_blocker()` says so and the loop does not save, so a checkpoint
of a dying model never replaces the last good one. The stop raises `Diverged` (exit status 3).
"""

import math

from nanochat.common import UserError

DEAD_GRAD_NORM = 1e-12
DEAD_GRAD_STEPS = 5
STALL_MARGIN = 0.01  # nats
STALL_STEPS = 50
DIVERGED_EXIT = 3


class Diverged(UserError):
    """The run diverged or collapsed: entry points print it as one line and exit with DIVERGED_EXIT."""
    exit_status = DIVERGED_EXIT


class Health:
    """The health rules of one run: `check(step, loss, grad_norm)` once per step. `note()` says what the run
    leaves behind (the last good checkpoint), for the end of the stop's message."""

    def __init__(self, vocab_size, warmup_steps=0, note=None):
        self.untrained_loss = math.log(vocab_size)
        self.note = note
        self.stall_from = max(warmup_steps, STALL_STEPS)  # the stall counter starts after this step
        self.dead_grad = 0  # steps in a row with no gradient
        self.stalled = 0    # steps in a row, after stall_from, no better than the untrained model

    def describe(self):
        return (f"Health: the run stops (exit status {DIVERGED_EXIT}, nothing saved) when the loss or gradient norm is "
                f"not finite, when the gradient norm is <= {DEAD_GRAD_NORM:g} for {DEAD_GRAD_STEPS} steps in a row, or "
                f"when the loss stays >= ln(vocab) - {STALL_MARGIN} = {self.untrained_loss - STALL_MARGIN:.4f} for "
                f"{STALL_STEPS} steps in a row after step {self.stall_from}")

    def check(self, step, loss, grad_norm):
        """Raise Diverged for update number `step` (1-based) with this loss and gradient norm, or count it."""
        fix = "lower the learning rates (or raise --warmup_ratio) and start the run again" + (f"; {self.note()}" if self.note else "")
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise Diverged(f"training diverged at step {step}: loss {loss}, gradient norm {grad_norm}; the update was not "
                           f"applied; {fix}")
        self.dead_grad = self.dead_grad + 1 if grad_norm <= DEAD_GRAD_NORM else 0
        if self.dead_grad >= DEAD_GRAD_STEPS:
            raise Diverged(f"training collapsed: the gradient norm has been {grad_norm:g} (<= {DEAD_GRAD_NORM:g}) for "
                           f"{self.dead_grad} steps, to step {step}, at loss {loss:.4f} (untrained: {self.untrained_loss:.4f}); "
                           f"the model no longer learns; {fix}")
        stalled = step > self.stall_from and loss >= self.untrained_loss - STALL_MARGIN
        self.stalled = self.stalled + 1 if stalled else 0
        if self.stalled >= STALL_STEPS:
            raise Diverged(f"training is not learning: the loss has stayed >= {self.untrained_loss - STALL_MARGIN:.4f} "
                           f"(the untrained model's ln(vocab) = {self.untrained_loss:.4f}, less {STALL_MARGIN}) for "
                           f"{self.stalled} steps, to step {step} (loss {loss:.4f}); {fix}")

    def save_blocker(self):
        """Why the current weights must not be saved (a no-gradient streak is running), or None."""
        if self.dead_grad:
            return f"the gradient norm has been <= {DEAD_GRAD_NORM:g} for {self.dead_grad} step(s): the model may have collapsed"
        return None
