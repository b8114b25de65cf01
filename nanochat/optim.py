"""Optimizers: Muon for the 2-D matrices inside the blocks, AdamW for embedding and lm_head.

One implementation serves single-process and torch.distributed runs: the training loop averages
gradients across ranks before `step()`, so every rank holds the same (replicated) state and takes
the same update. Muon knows each matrix's layer: a layer in protected (low-rank) mode has its
gradient projected before it enters the momentum and its orthogonalised update projected again
before it is applied, so the step trains only the minor subspace with the same learning rate,
momentum and scaling as a full step. AdamW's update is elementwise (it leaves any subspace), so a matrix
it trains is protected on the applied change instead: `AdamW.confine` replaces each step's change by its
projection onto the minor subspace, which keeps the protected singular triples exact as well.
"""

import torch

from nanochat.adaptive_svd import Mode, project

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def zeropower_via_newtonschulz5(G, steps=5, dtype=None):
    """Approximately orthogonalise G (or a batch of G) with the quintic Newton-Schulz iteration.

    Works on the Frobenius-normalised matrix, wide orientation (rows <= cols) so X X^T is small.
    `dtype` is the matmul dtype: bf16 wherever bf16 matmuls are native and faster (the iteration
    tolerates it, as in upstream nanochat); None = bf16 on CUDA, fp32 elsewhere. Returns that dtype.
    """
    a, b, c = NS_COEFFS
    if dtype is None:
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = torch.baddbmm(A, A, A, beta=b, alpha=c) if A.dim() == 3 else torch.addmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a) if X.dim() == 3 else torch.addmm(X, B, X, beta=a)
    if transposed:
        X = X.mT
    return X


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D weights.

    update = NS5(nesterov(momentum(grad))) * sqrt(max(1, rows/cols)), no weight decay.
    `named_params` is a list of (name, parameter); state_dict/load_state_dict are keyed by name.
    `layers` maps a parameter to the module that owns it when that module can be protected
    (an AdaptiveSVDLinear, anything with `mode` and `project`): while it is low-rank, the gradient
    is projected before the momentum and the orthogonalised update after Newton-Schulz (which keeps
    row and column spaces in exact arithmetic; the second projection removes bf16 leakage).
    `ns_dtype` is Newton-Schulz's matmul dtype (see zeropower_via_newtonschulz5); the momentum and
    the weights stay in the parameters' dtype.
    """

    def __init__(self, named_params, lr=0.02, momentum=0.95, nesterov=True, ns_steps=5, layers=None, ns_dtype=None):
        named_params = list(named_params)
        self.names = {p: n for n, p in named_params}
        self.layers = dict(layers or {})
        self.ns_dtype = ns_dtype
        super().__init__([p for _, p in named_params],
                         dict(lr=lr, initial_lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps))

    def params(self):
        return self.param_groups[0]["params"]

    def _protected(self, p):
        layer = self.layers.get(p)
        return layer if layer is not None and layer.mode == Mode.LOWRANK else None

    @torch.no_grad()
    def step(self):
        group = self.param_groups[0]
        momentum, nesterov = group["momentum"], group["nesterov"]
        # batch Newton-Schulz over matrices of one shape, tall ones transposed to wide so that
        # e.g. (1024, 256) and (256, 1024) share a batch
        by_shape = {}
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p)
            buf = st["momentum_buffer"]
            layer = self._protected(p)
            grad = p.grad if layer is None else layer.project(p.grad).to(p.grad.dtype)
            buf.lerp_(grad, 1 - momentum)
            update = grad.lerp(buf, momentum) if nesterov else buf
            tall = p.shape[0] > p.shape[1]
            by_shape.setdefault(tuple(sorted(p.shape)), []).append((p, update.mT if tall else update))
        for shape, entries in by_shape.items():
            ortho = zeropower_via_newtonschulz5(torch.stack([u for _, u in entries]), group["ns_steps"], self.ns_dtype)
            for (p, _), o in zip(entries, ortho):
                scale = max(1.0, p.shape[0] / p.shape[1]) ** 0.5
                o = o.mT if p.shape[0] > p.shape[1] else o
                layer = self._protected(p)
                if layer is not None:
                    o = layer.project(o)
                p.add_(o.to(p.dtype), alpha=-group["lr"] * scale)

    @torch.no_grad()
    def project_momentum(self, p):
        """Entering (or widening) protection: confine p's momentum to the minor subspace, once."""
        layer = self._protected(p)
        buf = self.state[p].get("momentum_buffer")
        if layer is not None and buf is not None:
            buf.copy_(layer.project(buf))

    def state_dict(self):
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        buffers = {self.names[p]: self.state[p]["momentum_buffer"] for p in self.params() if "momentum_buffer" in self.state[p]}
        return {"group": group, "param_names": [self.names[p] for p in self.params()], "momentum": buffers}

    def load_state_dict(self, sd):
        names = [self.names[p] for p in self.params()]
        if sorted(names) != sorted(sd["param_names"]):
            raise ValueError("Muon state does not match the model's matrix parameters")
        self.param_groups[0].update(sd["group"])
        by_name = {self.names[p]: p for p in self.params()}
        for name, buf in sd["momentum"].items():
            p = by_name[name]
            self.state[p]["momentum_buffer"] = buf.to(device=p.device, dtype=p.dtype).clone()


class AdamW(torch.optim.AdamW):
    """torch's AdamW, and for a matrix given `confine(p, U_k, V_k)` each step's change dW (moments, learning rate and
    weight decay as usual) replaced by (I - U_k U_k^T) dW (I - V_k V_k^T): with U_k, V_k the top singular vectors of
    p when confined, its top-k singular triples then stay exact (p V_k = U_k S_k, U_k^T p = S_k V_k^T) however many
    steps follow. The moments keep the whole gradient, as in an unconfined run; only what is applied is confined.
    Nothing confined: torch's step, untouched (the bit-identical default)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.confined = {}  # parameter -> (U_k, V_k), fp32

    def confine(self, p, U_k, V_k):
        self.confined[p] = (U_k.detach().to(p.device, torch.float32).contiguous(),
                            V_k.detach().to(p.device, torch.float32).contiguous())

    @torch.no_grad()
    def step(self, closure=None):
        before = {p: p.detach().float().clone() for p in self.confined if p.grad is not None}
        loss = super().step(closure)
        for p, W0 in before.items():
            p.copy_((W0 + project(p.float() - W0, *self.confined[p])).to(p.dtype))
        return loss


def build_optimizers(model, matrix_lr, embedding_lr, unembedding_lr, weight_decay=0.0, ns_dtype=None):
    """Muon for the block matrices, AdamW (betas 0.8/0.95, eps 1e-10) for embedding and lm_head,
    the AdamW rates scaled by (model_dim/768)^-0.5 as in nanochat. `ns_dtype`: Muon's."""
    model_dim = model.config.n_embd
    scale = (model_dim / 768) ** -0.5
    matrices = [(n, p) for n, p in model.named_parameters() if n.startswith("transformer.h.")]
    device = model.get_device()
    fused = device.type in ("cuda", "cpu")
    adamw = AdamW(
        [dict(params=[model.lm_head.weight], lr=unembedding_lr * scale),
         dict(params=[model.transformer.wte.weight], lr=embedding_lr * scale)],
        betas=(0.8, 0.95), eps=1e-10, weight_decay=weight_decay, fused=fused)
    for group in adamw.param_groups:
        group["initial_lr"] = group["lr"]
    # every matrix whose module can be protected (AdaptiveSVDLinear) is known to Muon by its layer
    layers = {m.weight: m for m in model.modules() if hasattr(m, "project") and hasattr(m, "mode")}
    muon = Muon(matrices, lr=matrix_lr, momentum=0.95, layers=layers, ns_dtype=ns_dtype)
    return muon, adamw


def muon_momentum(step):
    """Nesterov momentum ramped linearly 0.85 -> 0.95 over the first 300 steps."""
    frac = min(step / 300, 1.0)
    return (1 - frac) * 0.85 + frac * 0.95
