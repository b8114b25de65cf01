"""Inference: a KV cache and batched sampling from a prompt, as used by the researcher's snippet.

    engine = Engine(model, tokenizer)
    results, masks = engine.generate_batch(tokens, num_samples=1, max_tokens=20, temperature=0)

`results[i]` is the prompt followed by the sampled tokens; `masks[i]` marks sampled tokens with 1.
"""

import torch


class KVCache:
    """Keys and values per layer, shape (layers, batch, kv_heads, max_len, head_dim) each."""

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype):
        shape = (num_layers, batch_size, num_heads, seq_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos = 0
        self.num_layers = num_layers

    def get_pos(self):
        return self.pos

    def insert_kv(self, layer_idx, k, v):
        """Store this step's k, v of one layer and return everything cached so far for it.
        The position advances once the last layer has written."""
        t0, t1 = self.pos, self.pos + k.size(2)
        if t1 > self.k.size(3):
            raise ValueError(f"KV cache full: {t1} > {self.k.size(3)} positions")
        self.k[layer_idx, :, :, t0:t1] = k
        self.v[layer_idx, :, :, t0:t1] = v
        if layer_idx == self.num_layers - 1:
            self.pos = t1
        return self.k[layer_idx, :, :, :t1], self.v[layer_idx, :, :, :t1]

    def expand(self, batch_size):
        """Copy a batch-1 cache (after the prompt) into `batch_size` rows for independent samples."""
        self.k = self.k.expand(-1, batch_size, -1, -1, -1).contiguous()
        self.v = self.v.expand(-1, batch_size, -1, -1, -1).contiguous()


def sample_next(logits, generator, temperature=1.0, top_k=None):
    """Greedy at temperature 0, else softmax sampling (optionally restricted to the top k)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
        logits = logits.masked_fill(logits < v[:, [-1]], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


class Engine:
    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @torch.inference_mode()
    def generate_batch(self, tokens, num_samples=1, max_tokens=16, temperature=1.0, top_k=None, seed=42):
        """Sample `num_samples` continuations of the prompt `tokens` (a list of ids), stopping at
        <|assistant_end|> or <|bos|>. Returns (results, masks), each a list of token lists."""
        model, device = self.model, self.model.get_device()
        cfg = model.config
        generator = torch.Generator(device=device).manual_seed(seed)
        stop = {self.tokenizer.get_bos_token_id(), self.tokenizer.encode_special("<|assistant_end|>")}
        dtype = next(model.parameters()).dtype
        cache = KVCache(1, cfg.n_kv_head, len(tokens) + max_tokens, cfg.n_embd // cfg.n_head, cfg.n_layer, device, dtype)
        logits = model(torch.tensor([tokens], dtype=torch.long, device=device), kv_cache=cache)[:, -1, :]
        cache.expand(num_samples)
        logits = logits.expand(num_samples, -1)
        results = [list(tokens) for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        done = [False] * num_samples
        for _ in range(max_tokens):
            nxt = sample_next(logits, generator, temperature, top_k)
            for i, t in enumerate(nxt[:, 0].tolist()):
                if not done[i]:
                    if t in stop:
                        done[i] = True
                    else:
                        results[i].append(t)
                        masks[i].append(1)
            if all(done):
                break
            logits = model(nxt, kv_cache=cache)[:, -1, :]
        return results, masks
