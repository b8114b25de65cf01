"""Bits per byte on a hand-computed case."""

import math

import torch

from nanochat.loss_eval import evaluate_bpb


class FixedLossModel:
    """Stands in for GPT: returns given per-token losses (nats) for loss_reduction='none'."""

    def __init__(self, losses):
        self.losses = losses

    def get_device(self):
        return torch.device("cpu")

    def __call__(self, x, y, loss_reduction="mean"):
        assert loss_reduction == "none"
        return self.losses


def test_bpb_hand_computed():
    # vocab of 5 tokens: byte lengths 0 (a special), 1, 2, 3, 4
    token_bytes = torch.tensor([0, 1, 2, 3, 4])
    y = torch.tensor([[1, 2, 0, 4, -1]])  # token 0 is special (0 bytes), -1 is ignored
    losses = torch.tensor([[0.5, 1.0, 9.0, 2.0, 7.0]])
    # counted: targets 1, 2, 4 -> nats 0.5 + 1.0 + 2.0 = 3.5 over bytes 1 + 2 + 4 = 7
    expected = 3.5 / (math.log(2) * 7)
    bpb = evaluate_bpb(FixedLossModel(losses), [(None, y)], 1, token_bytes)
    assert abs(bpb - expected) < 1e-12


def test_bpb_sums_over_batches_before_dividing():
    token_bytes = torch.tensor([0, 1, 3])
    batches = [(None, torch.tensor([[1]])), (None, torch.tensor([[2]]))]
    model_losses = iter([torch.tensor([[2.0]]), torch.tensor([[3.0]])])

    class Model(FixedLossModel):
        def __call__(self, x, y, loss_reduction="mean"):
            return next(model_losses)

    bpb = evaluate_bpb(Model(None), batches, 2, token_bytes)
    assert abs(bpb - (2.0 + 3.0) / (math.log(2) * (1 + 3))) < 1e-12  # not the mean of per-batch ratios
