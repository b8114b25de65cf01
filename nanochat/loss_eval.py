"""Bits per byte: a tokenizer-independent validation loss."""

import math

import torch
import torch.distributed as dist


@torch.no_grad()
def evaluate_bpb(model, batches, steps, token_bytes, stop=None):
    """Sum of per-token nats over targets whose token has bytes > 0 (specials and ignored targets
    are left out), divided by ln 2 times the sum of those tokens' UTF-8 byte lengths; both sums are
    reduced over ranks so every rank returns the same number. `stop.check()` (nanochat.stopping) runs
    before every batch, so a stop signal abandons a long evaluation within one batch."""
    device = model.get_device()
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    total_bytes = torch.zeros((), dtype=torch.int64, device=device)
    token_bytes = token_bytes.to(device)
    batch_iter = iter(batches)
    for _ in range(steps):
        if stop is not None:
            stop.check()
        x, y = next(batch_iter)
        loss = model(x, y, loss_reduction="none").reshape(-1)
        y = y.reshape(-1)
        nbytes = torch.where(y < 0, torch.zeros_like(y), token_bytes[y.clamp(min=0)])
        counted = nbytes > 0
        total_nats += (loss.double() * counted).sum()
        total_bytes += nbytes.sum()
    if dist.is_initialized():
        dist.all_reduce(total_nats)
        dist.all_reduce(total_bytes)
    nbytes = total_bytes.item()
    if nbytes == 0:
        raise ValueError("evaluation saw no target bytes; increase --eval_tokens")
    return total_nats.item() / (math.log(2) * nbytes)
