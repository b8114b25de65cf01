"""The GPT model (nanochat, early November 2025) and AdaptiveSVDLinear, its switchable layer.

Facts the model matches (upstream nanochat, early November 2025): rotary embeddings without positional embeddings,
parameter-free RMSNorm, QK norm, ReLU^2 MLP, untied soft-capped lm_head, no biases, MQA/GQA-ready.
"""

import math
from dataclasses import dataclass, asdict

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat.adaptive_svd import Mode, project

SOFTCAP = 15.0


@dataclass
class GPTConfig:
    sequence_len: int = 1024
    vocab_size: int = 65536
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768

    @classmethod
    def from_depth(cls, depth, vocab_size, sequence_len):
        """The one dial: model_dim = 64 * depth, heads of (at most) 128 dims."""
        model_dim = 64 * depth
        n_head = max(1, -(-model_dim // 128))
        return cls(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth,
                   n_head=n_head, n_kv_head=n_head, n_embd=model_dim)

    def to_dict(self):
        return asdict(self)


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary_emb(x, cos, sin):
    """Half-split rotation of the last dim: (x1, x2) -> (x1 cos + x2 sin, -x1 sin + x2 cos)."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)


class AdaptiveSVDLinear(nn.Module):
    """A bias-free Linear whose updates can be confined to its minor singular subspace.

    Its only parameter is `weight` and its forward is always x W^T, so the model graph, the parameter
    set, the optimizer groups and the state dict are the same in both modes (a plain GPT loads it,
    and torch.compile never sees a switch). Low-rank (protected) mode holds orthonormal bases U_k
    (n_out x k) and V_k (n_in x k) of the principal (learned) directions, plain tensors outside the
    module's state, and the optimizer applies only `project(dW)` = (I - U_k U_k^T) dW (I - V_k V_k^T).
    That keeps W V_k = U_k S_k and U_k^T W = S_k V_k^T exact and every update of rank <= g - k; with
    k = 0 the projection is the identity, so low-rank mode is then full mode, bit for bit.
    """

    def __init__(self, in_features, out_features, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.U_k = None
        self.V_k = None

    @property
    def mode(self):
        return Mode.FULL if self.U_k is None else Mode.LOWRANK

    @property
    def rank(self):
        """r: the rank an update can have (g in full mode, g - k while protected)."""
        g = min(self.in_features, self.out_features)
        return g if self.U_k is None else g - self.U_k.shape[1]

    def forward(self, x):
        return F.linear(x, self.weight)

    def protect(self, U_k, V_k):
        """Enter (or refresh) low-rank mode: from now on updates avoid span(U_k) and span(V_k)."""
        dev = self.weight.device
        self.U_k = U_k.detach().to(dev, torch.float32).contiguous()
        self.V_k = V_k.detach().to(dev, torch.float32).contiguous()

    def unprotect(self):
        """Back to full mode: the whole matrix trains again."""
        self.U_k = self.V_k = None

    def project(self, X):
        """(I - U_k U_k^T) X (I - V_k V_k^T) in fp32; X itself (as fp32) in full mode."""
        return project(X, self.U_k, self.V_k)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}, r={self.rank}"


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.n_embd = config.n_embd
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0 and config.n_head % config.n_kv_head == 0
        self.c_q = nn.Linear(self.n_embd, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(self.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(self.n_embd, self.n_embd, bias=False)

    def forward(self, x, cos_sin, kv_cache):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        cos, sin = cos_sin
        q, k = apply_rotary_emb(q, cos, sin), apply_rotary_emb(k, cos, sin)
        q, k = norm(q), norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        if kv_cache is not None:
            k, v = kv_cache.insert_kv(self.layer_idx, k, v)
        Tq, Tk = q.size(2), k.size(2)
        gqa = self.n_head != self.n_kv_head
        if kv_cache is None or Tq == Tk:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif Tq == 1:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=False, enable_gqa=gqa)
        else:
            # a chunk of new queries after a prefix in the cache: see the whole prefix, causal within the chunk
            prefix = Tk - Tq
            mask = torch.ones((Tq, Tk), dtype=torch.bool, device=q.device)
            mask[:, prefix:] = torch.tril(mask[:, prefix:])
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, cos_sin, kv_cache):
        x = x + self.attn(norm(x), cos_sin, kv_cache)
        return x + self.mlp(norm(x))


_WORKSPACE = {}


def _workspace(name, rows, cols, device, dtype=torch.float32):
    """Reused (rows x cols) buffers: a fresh 100+ MB tensor every step costs page faults on CPU."""
    key = (name, device, dtype)
    buf = _WORKSPACE.get(key)
    if buf is None or buf.numel() < rows * cols:
        buf = _WORKSPACE[key] = torch.empty(rows * cols, dtype=dtype, device=device)
    return buf[:rows * cols].view(rows, cols)


def matmul_dtype(device_type):
    """The fused loss's matmul dtype: bf16 under bf16 autocast on this device, else fp32 (fp16 would
    overflow: the gradient matrix holds values up to V e^15)."""
    bf16 = torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16
    return torch.bfloat16 if bf16 else torch.float32


def softcap_cross_entropy_chunks(x, weight, targets, need_grad, max_elements=2 ** 25, dtype=torch.float32):
    """Per-token cross-entropy of soft-capped logits z = 15 tanh(x W^T / 15), a chunk of rows at a time.

    Gradients are formed in the same pass: with e = exp(z) and s = sum(e),
    dL/d(x W^T) = (e / s - onehot) (1 - tanh^2), and the per-row factors (1/s, 1/count) are applied
    to the small (rows x d) matrices instead of the (rows x vocab) one. The chunk is as many rows as
    fit in `max_elements` logits, so at most two such buffers exist and they are reused across calls.
    `dtype` (fp32 or bf16) is the dtype of the three matmuls (logits, grad_x, grad_w); the soft-cap,
    exp, the sums and the gradient factors are fp32 in any case, computed from the (bf16) logits.
    Returns (losses (N,), grad_x, grad_w), the gradients being those of the mean over valid targets.
    """
    N, V = x.shape[0], weight.shape[0]
    chunk = max(1, min(N, max_elements // V))
    valid = targets != -1
    count = valid.sum().clamp(min=1)
    losses = torch.empty(N, dtype=torch.float32, device=x.device)
    grad_x = torch.empty_like(x) if need_grad else None
    grad_w = None
    low = dtype == torch.bfloat16
    w = weight.to(dtype) if low else weight.float()
    for s in range(0, N, chunk):
        xs = x[s:s + chunk].float()
        rows = xs.shape[0]
        ts = targets[s:s + chunk].clamp(min=0)[:, None]
        vs = valid[s:s + chunk]
        if low:
            logits = torch.mm((xs / SOFTCAP).to(dtype), w.T, out=_workspace("t", rows, V, x.device, dtype))
            t = _workspace("t", rows, V, x.device).copy_(logits)
        else:
            t = torch.mm(xs / SOFTCAP, w.T, out=_workspace("t", rows, V, x.device))
        t.tanh_()                                        # t = tanh(logits / 15)
        # |z| <= 15 and the exp and the sum are fp32: exp(z) <= e^15 and the row sum <= V e^15 < 3.4e38
        # for any V < 1e31, so no max-subtraction pass is needed
        e = torch.mul(t, SOFTCAP, out=_workspace("e", rows, V, x.device))
        e.exp_()                                         # e = exp(z)
        sumexp = e.sum(dim=1, keepdim=True)
        z_target = SOFTCAP * t.gather(1, ts)
        losses[s:s + chunk] = (sumexp.log() - z_target).squeeze(1) * vs
        if need_grad:
            e.scatter_add_(1, ts, -sumexp)               # e - s * onehot = s (softmax - onehot)
            t.mul_(t)
            row_scale = vs.float()[:, None] / (sumexp * count)
            if low:
                # times (1 - tanh^2), computed in fp32 and stored in bf16 in the spent logits' buffer
                g = torch.addcmul(e, e, t, value=-1.0, out=logits)
                grad_x[s:s + chunk] = (torch.mm(g, w).float() * row_scale).to(x.dtype)
                gw = torch.mm(g.T, (xs * row_scale).to(dtype)).float()
            else:
                e.addcmul_(e, t, value=-1.0)             # times (1 - tanh^2)
                grad_x[s:s + chunk] = (torch.mm(e, w) * row_scale).to(x.dtype)
                gw = torch.mm(e.T, xs * row_scale)
            grad_w = gw if grad_w is None else grad_w.add_(gw)
    return losses, grad_x, grad_w


class SoftcapCrossEntropyMean(torch.autograd.Function):
    """Mean soft-capped cross-entropy over valid targets, gradients formed in the forward pass.
    Its matmuls run in autocast's dtype when autocast is on (see softcap_cross_entropy_chunks)."""

    @staticmethod
    def forward(ctx, x, weight, targets):
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        losses, grad_x, grad_w = softcap_cross_entropy_chunks(x, weight, targets, need_grad,
                                                              dtype=matmul_dtype(x.device.type))
        ctx.save_for_backward(grad_x, grad_w)
        ctx.weight_dtype = weight.dtype
        return losses.sum() / (targets != -1).sum().clamp(min=1)

    @staticmethod
    def backward(ctx, grad_mean):
        grad_x, grad_w = ctx.saved_tensors
        # the saved gradients are used once: scale them in place (a 67 MB pass for a 65,536 vocab),
        # and not at all in the usual case of an unscaled loss on CPU
        if not (grad_mean.device.type == "cpu" and grad_mean.item() == 1.0):
            grad_x.mul_(grad_mean)
            grad_w.mul_(grad_mean)
        return grad_x, grad_w.to(ctx.weight_dtype), None


@torch.compiler.disable
def fused_softcap_loss(x, weight, targets, reduction):
    """The chunked soft-capped cross-entropy: its mean (gradient fused) or per-token losses ('none').
    Always eager: in a compiled CPU forward it is a graph break, because there the compiled plain
    formula, which materialises the (tokens x vocab) logits gradient, is slower than this."""
    if reduction == "mean":
        return SoftcapCrossEntropyMean.apply(x, weight, targets)
    if reduction == "none":
        with torch.no_grad():
            return softcap_cross_entropy_chunks(x, weight, targets, False, dtype=matmul_dtype(x.device.type))[0]
    raise ValueError(f"unknown loss_reduction {reduction!r}")


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(config.vocab_size, config.n_embd),
            "h": nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        })
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # rotary tables cover 10x the training length so generation can run past it
        self.rotary_seq_len = config.sequence_len * 10
        head_dim = config.n_embd // config.n_head
        cos, sin = self._precompute_rotary(self.rotary_seq_len, head_dim)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def _precompute_rotary(self, seq_len, head_dim, base=10000, device=None):
        if device is None:
            device = self.transformer.wte.weight.device
        channel = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        return freqs.cos()[None, :, None, :], freqs.sin()[None, :, None, :]  # (1, T, 1, D/2)

    @torch.no_grad()
    def init_weights(self):
        """N(0, std) Linears with std = 1/sqrt(fan_in) * min(1, sqrt(fan_out/fan_in)); N(0,1) embedding;
        zero lm_head and output projections, so the first loss is exactly ln(vocab)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, AdaptiveSVDLinear)):
                fan_out, fan_in = module.weight.shape
                std = 1.0 / math.sqrt(fan_in) * min(1.0, math.sqrt(fan_out / fan_in))
                module.weight.normal_(0.0, std)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0)
        self.lm_head.weight.zero_()
        for block in self.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()
        head_dim = self.config.n_embd // self.config.n_head
        cos, sin = self._precompute_rotary(self.rotary_seq_len, head_dim)
        self.cos.copy_(cos)
        self.sin.copy_(sin)

    def get_device(self):
        return self.transformer.wte.weight.device

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def estimate_flops(self):
        """FLOPs per token: 6 (N - N_embedding) for the matmuls plus 12 L H D T for attention."""
        nparams_embedding = self.transformer.wte.weight.numel()
        c = self.config
        l, h, q, t = c.n_layer, c.n_head, c.n_embd // c.n_head, c.sequence_len
        return 6 * (self.num_params() - nparams_embedding) + 12 * l * h * q * t

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.size()
        T0 = 0 if kv_cache is None else kv_cache.get_pos()
        assert T0 + T <= self.cos.size(1), f"sequence length {T0 + T} exceeds the rotary cache {self.cos.size(1)}"
        cos_sin = self.cos[:, T0:T0 + T], self.sin[:, T0:T0 + T]
        x = norm(self.transformer.wte(idx))
        for block in self.transformer.h:
            x = block(x, cos_sin, kv_cache)
        x = norm(x)
        if targets is None:
            logits = self.lm_head(x).float()
            return SOFTCAP * torch.tanh(logits / SOFTCAP)
        x2, t2 = x.view(B * T, -1), targets.reshape(-1)
        if torch.compiler.is_compiling() and x.device.type != "cpu":
            # on GPUs the compiler fuses the plain formula well. Under autocast the logits come out
            # of lm_head in bf16; soft-cap and cross-entropy are fp32
            logits = SOFTCAP * torch.tanh(self.lm_head(x2).float() / SOFTCAP)
            return F.cross_entropy(logits, t2, ignore_index=-1, reduction=loss_reduction)
        loss = fused_softcap_loss(x2, self.lm_head.weight, t2, loss_reduction)
        return loss if loss_reduction == "mean" else loss.view(B, T)
