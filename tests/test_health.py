"""A run that diverges or collapses stops in one line (exit status 3), never saves non-finite or dying
weights, and leaves the last good checkpoint byte for byte as it was."""

import math
import os

import pytest
import torch

from nanochat import health
from nanochat.checkpoint_manager import CHECKPOINT_NAME, load_checkpoint, save_checkpoint
from nanochat.health import DEAD_GRAD_STEPS, STALL_MARGIN, STALL_STEPS, Diverged, Health
from nanochat import train as train_module
from nanochat.hooks import TrainHook
from nanochat.train import TrainConfig, train
from tests.conftest import tiny_model

TINY = dict(depth=2, max_seq_len=64, device_batch_size=2, total_batch_size=256, eval_tokens=1024, sample_every=-1,
            eval_every=-1, device_type="cpu", dtype="float32")
V = 4096  # the prepared base's vocabulary


@pytest.fixture
def base(prepared_base, monkeypatch, one_thread):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(prepared_base))
    return prepared_base


# -------------------------------------------------------------------- the rules, on numbers

def test_non_finite_loss_or_gradient_stops_at_once():
    for loss, norm in ((math.nan, 1.0), (math.inf, 1.0), (8.0, math.nan), (8.0, -math.inf)):
        with pytest.raises(Diverged, match=f"training diverged at step 3: loss {loss}, gradient norm {norm}; the update "
                                           f"was not applied"):
            Health(V).check(3, loss, norm)


def test_a_zero_gradient_blocks_saves_and_stops_after_its_streak():
    h = Health(V)
    for step in range(1, DEAD_GRAD_STEPS):
        h.check(step, 8.3, 0.0)
        assert h.save_blocker() == f"the gradient norm has been <= 1e-12 for {step} step(s): the model may have collapsed"
    h.check(DEAD_GRAD_STEPS, 8.3, 0.5)  # a step with a gradient ends the streak
    assert h.save_blocker() is None
    for step in range(DEAD_GRAD_STEPS):
        if step == DEAD_GRAD_STEPS - 1:
            with pytest.raises(Diverged, match=f"gradient norm has been 0 .* for {DEAD_GRAD_STEPS} steps, to step 14"):
                h.check(10 + step, 8.3, 0.0)
        else:
            h.check(10 + step, 8.3, 0.0)


def test_a_loss_no_better_than_the_untrained_model_stops_only_after_warm_up_and_its_streak():
    untrained = math.log(V)
    h = Health(V, warmup_steps=80)
    assert h.stall_from == 80
    for step in range(1, 81 + STALL_STEPS - 1):  # at ln V throughout: nothing until the streak after warm-up is full
        h.check(step, untrained, 0.3)
    with pytest.raises(Diverged, match=rf"not learning: the loss has stayed >= {untrained - STALL_MARGIN:.4f}"):
        h.check(81 + STALL_STEPS - 1, untrained + 5, 0.3)  # above ln V counts too (saturated, worse than uniform)
    h = Health(V)
    assert h.stall_from == STALL_STEPS  # no warm-up: the first STALL_STEPS steps are grace
    for step in range(1, 500):  # just below the margin: learning, however slowly
        h.check(step, untrained - STALL_MARGIN - 1e-3, 0.3)
    assert h.save_blocker() is None


def test_the_thresholds_are_declared_once_and_printed():
    text = Health(V, warmup_steps=7).describe()
    for value in (f"{health.DEAD_GRAD_NORM:g}", f"{DEAD_GRAD_STEPS} steps", f"{STALL_MARGIN}", f"{STALL_STEPS} steps",
                  f"{math.log(V) - STALL_MARGIN:.4f}", f"after step {STALL_STEPS}", "exit status 3"):
        assert value in text, value


def test_save_checkpoint_refuses_non_finite_weights_and_writes_nothing(tmp_path):
    tmp_path = tmp_path / "run"
    model = tiny_model()
    ckpt = {"model": model.state_dict(), "metadata": {"model_config": {}, "step": 5}, "optim": {"adamw": {"lr": 0.1}}}
    save_checkpoint(str(tmp_path), ckpt, {"step": 5})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for where, poison in (("model weight lm_head.weight", lambda c: c["model"]["lm_head.weight"].view(-1)[7:10].fill_(math.inf)),
                          ("optimizer state adamw.lr", lambda c: c["optim"]["adamw"].update(lr=math.nan))):
        bad = {"model": {k: v.clone() for k, v in ckpt["model"].items()}, "metadata": {"model_config": {}, "step": 6},
               "optim": {"adamw": {"lr": 0.1}}}
        poison(bad)
        with pytest.raises(Diverged, match=f"refused to save step 6: its {where} holds [13] NaN or infinite values"):
            save_checkpoint(str(tmp_path), bad, {"step": 6})
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# -------------------------------------------------------------------- in a run

class Overflow(TrainHook):
    """During update `at`, makes the Muon learning rate infinite (what --matrix_lr=inf does): the update turns the
    block matrices infinite from a finite loss and gradient."""

    def __init__(self, at):
        self.at = at

    def attach(self, run):
        self.run = run

    def after_backward(self, step, last_step):
        if step == self.at:
            for group in self.run.muon.param_groups:
                group["initial_lr"] = math.inf


@pytest.mark.parametrize("flags,hook,expect", [
    # weights of ~1e38 overflow in step 3's backward: stopped before the update, the step-2 checkpoint stays
    (dict(matrix_lr=1e38, save_every=2), None, r"training diverged at step 3: loss 8\.\d+, gradient norm nan; the update "
                                               r"was not applied"),
    # a finite loss and gradient, but the update makes the weights infinite: the save of step 4 is refused
    (dict(save_every=1), Overflow(4), r"refused to save step 4: its model weight transformer\.h\.0\.attn\.c_q\.weight "
                                      r"holds [0-9,]+ NaN or infinite values"),
    # every output saturated: no gradient from step 4 on; saves held, stopped after the streak
    (dict(matrix_lr=1e6, save_every=2), None, rf"training collapsed: the gradient norm has been 0 \(<= 1e-12\) for "
                                              rf"{DEAD_GRAD_STEPS} steps, to step {3 + DEAD_GRAD_STEPS}"),
])
def test_divergence_and_collapse_stop_in_one_line_and_keep_the_last_good_checkpoint(base, tmp_path, monkeypatch, flags,
                                                                                     hook, expect):
    saved = []  # the bytes of checkpoint.pt after each save that went through

    def save_and_keep_bytes(ckpt_dir, *args):
        save_checkpoint(ckpt_dir, *args)
        saved.append(open(os.path.join(ckpt_dir, CHECKPOINT_NAME), "rb").read())

    monkeypatch.setattr(train_module, "save_checkpoint", save_and_keep_bytes)
    with pytest.raises(Diverged, match=expect) as e:
        train(TrainConfig(**TINY, **flags, num_iterations=20, output_dir=str(tmp_path)), hook=hook)
    message = str(e.value)
    assert "\n" not in message and message.endswith("is intact") and "--resume" not in message
    path = os.path.join(tmp_path, "base_checkpoints", "d2", CHECKPOINT_NAME)
    assert saved and open(path, "rb").read() == saved[-1]  # byte for byte the last checkpoint before the failure
    ckpt = load_checkpoint(path)  # valid, finite, and the step the message names
    assert message.endswith(f"the last good checkpoint, at step {ckpt['loop']['step']}, is intact")
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_a_diverged_run_exits_3_with_one_line(base, tmp_path, cli):
    code, out, err = cli("scripts.base_train", *[f"--{k}={v}" for k, v in TINY.items()], "--num_iterations=10",
                         "--unembedding_lr=1e38", f"--output_dir={tmp_path}")
    assert code == 3 and len(err.strip().splitlines()) == 1 and err.startswith("error: training diverged at step 2"), err
    assert "Health: the run stops (exit status 3, nothing saved)" in out
