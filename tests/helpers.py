"""Helpers that only tests use."""

import torch


@torch.inference_mode()
def generate_no_cache(model, tokens, max_tokens):
    """Greedy generation by re-running the whole sequence each step (the reference for the KV cache)."""
    device = model.get_device()
    seq = list(tokens)
    for _ in range(max_tokens):
        logits = model(torch.tensor([seq], dtype=torch.long, device=device))[:, -1, :]
        seq.append(int(logits.argmax(dim=-1)))
    return seq
