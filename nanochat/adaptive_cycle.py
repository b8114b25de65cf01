"""The adaptive-SVD analysis cycle: ties the pure method (nanochat/adaptive_svd.py) to a live run.

Every `svd_interval` steps (and at the last step), between backward and the optimizer step, for each
target layer: SVD of W_eff, metrics against the previous analysis, a decision, then the action
(switch to low rank, switch back to full, or re-split the low-rank layer with the new r) with the
layer's Muon momentum carried by the gradient-consistent rule. Logs to the console, to
`svd_metrics.jsonl` next to the checkpoint and to wandb. Its state goes into the checkpoint.
"""

import dataclasses
import math
import time
import traceback
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from nanochat import adaptive_svd as asvd
from nanochat.cli import flag
from nanochat.common import UserError, print0
from nanochat.gpt import AdaptiveSVDLinear
from nanochat.train import TrainConfig, TrainHook

ATTN = ("c_q", "c_k", "c_v", "c_proj")
MLP = ("c_fc", "mlp.c_proj")
_P = asvd.SVDPolicy


@dataclass
class AdaptiveConfig(TrainConfig):
    adaptive_svd: bool = flag(True, "run the adaptive SVD analysis and switching (false = plain baseline loop)")
    adaptive_svd_target_layer: int = flag(0, "block index whose matrices are analysed; -1 = all blocks")
    svd_targets: str = flag("c_q", "comma list of matrices: c_q,c_k,c_v,c_proj (attention), c_fc, mlp.c_proj, or attn / mlp / all")
    svd_interval: int = flag(20, "analyse every N steps (and at the last step)")
    svd_method: str = flag("auto", "exact | warm | auto (exact for small matrices, warm-started subspace iteration for large)")
    svd_protect: str = flag("none", "none | project: keep B's and A's gradients out of the frozen principal subspace")
    svd_warmup_steps: int = flag(_P.svd_warmup_steps, "no switch before this step")
    svd_ratio_danger: float = flag(_P.svd_ratio_danger, "alignment_ratio (gradient or update) that switches full -> low-rank")
    svd_overlap_stable: float = flag(_P.svd_overlap_stable, "subspace overlap above chance counted as a stable principal subspace")
    svd_reconstruction_max: float = flag(_P.svd_reconstruction_max, "reconstruction error at the proposed r allowed for the stability switch")
    svd_trainable_fraction_min: float = flag(_P.svd_trainable_fraction_min, "low-rank factors must follow at least this share of ||G||^2")
    svd_angle_max: float = flag(_P.svd_angle_max, "radians of principal-subspace rotation that send a low-rank layer back to full")
    svd_patience: int = flag(_P.svd_patience, "consecutive bad analyses before low-rank -> full; analyses held after any switch")
    svd_rank_decay: float = flag(_P.svd_rank_decay, "r shrinks by this factor when the minor spectrum is stable")
    svd_minor_change_tol: float = flag(_P.svd_minor_change_tol, "relative minor-spectrum change separating shrink from grow")
    svd_rank_min: int = flag(_P.svd_rank_min, "lower bound of r")
    svd_principal_energy: float = flag(_P.svd_principal_energy, "share of ||W||_F^2 the principal part holds at first (chooses k_min)")


def policy_from(cfg):
    return asvd.SVDPolicy(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(asvd.SVDPolicy)})


def validate_adaptive(cfg):
    checks = [
        (cfg.svd_interval >= 1, "--svd_interval must be >= 1"),
        (cfg.svd_method in ("exact", "warm", "auto"), "--svd_method must be exact, warm or auto"),
        (cfg.svd_protect in ("none", "project"), "--svd_protect must be none or project"),
        (cfg.svd_ratio_danger > 0, "--svd_ratio_danger must be > 0"),
        (0 < cfg.svd_rank_decay < 1, "--svd_rank_decay must lie in (0, 1)"),
        (cfg.svd_rank_min >= 2, "--svd_rank_min must be >= 2"),
        (0 < cfg.svd_principal_energy < 1, "--svd_principal_energy must lie in (0, 1)"),
        (cfg.svd_patience >= 1, "--svd_patience must be >= 1"),
        (cfg.svd_minor_change_tol > 0, "--svd_minor_change_tol must be > 0"),
        (0 <= cfg.svd_trainable_fraction_min <= 1, "--svd_trainable_fraction_min must lie in [0, 1]"),
    ]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


def resolve_targets(model, target_layer, targets):
    """[(display name, parameter-path prefix, module)] for the chosen blocks and matrices."""
    n_layer = len(model.transformer.h)
    if target_layer == -1:
        blocks = range(n_layer)
    elif 0 <= target_layer < n_layer:
        blocks = [target_layer]
    else:
        raise UserError(f"--adaptive_svd_target_layer={target_layer} is out of range for depth {n_layer}; use 0..{n_layer - 1} or -1")
    names = []
    for item in (t.strip() for t in targets.split(",") if t.strip()):
        expanded = {"attn": ATTN, "mlp": MLP, "all": ATTN + MLP}.get(item, (item,))
        for name in expanded:
            if name not in ATTN + MLP + ("mlp.c_fc", "attn.c_proj"):
                raise UserError(f"unknown --svd_targets entry {item!r}; use c_q, c_k, c_v, c_proj, c_fc, mlp.c_proj, attn, mlp or all")
            names.append(name)
    if not names:
        raise UserError("--svd_targets is empty; name at least one matrix, e.g. c_q")
    resolved = []
    for b in blocks:
        for name in dict.fromkeys(names):
            path = name if "." in name else ("mlp." + name if name == "c_fc" else "attn." + name)
            resolved.append((f"block{b}.{path}", f"transformer.h.{b}.{path}", b, path))
    return resolved


def _swap_in(block, path):
    """Replace the plain Linear at `path` of a block by an AdaptiveSVDLinear holding the same weight."""
    parent_name, attr = path.split(".")
    parent = getattr(block, parent_name)
    old = getattr(parent, attr)
    if isinstance(old, AdaptiveSVDLinear):
        return old
    new = AdaptiveSVDLinear(old.in_features, old.out_features, device=old.weight.device, dtype=old.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(old.weight)
    setattr(parent, attr, new)
    return new


def _fmt(x, digits=4):
    return "n/a" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def assign_owners(layers, world_size, seconds=None):
    """{display name: rank that analyses it}: the costliest layers first, each to the least-loaded
    rank. Cost: the seconds the layer's analysis took last time when known (`seconds`, the same on
    every rank), else n_out * n_in * min(n_out, n_in). Deterministic, so every rank gets the same map."""
    def cost(display):
        if seconds and seconds.get(display) is not None:
            return seconds[display]
        n_out, n_in = layers[display][1].weight.shape
        return n_out * n_in * min(n_out, n_in)

    load = [0] * world_size
    owner = {}
    for i, display in sorted(enumerate(layers), key=lambda item: (-cost(item[1]), item[0])):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[display] = rank
        load[rank] += cost(display)
    return owner


class AdaptiveSVDHook(TrainHook):
    name = "adaptive_svd"

    def __init__(self, cfg):
        validate_adaptive(cfg)
        self.cfg = cfg
        self.policy = policy_from(cfg)
        self.layers = {}   # display name -> (param prefix, module)
        self.states = {}   # display name -> asvd.LayerSVDState
        self.k_min = {}    # display name -> k_min chosen at the first analysis
        self.prev_res = {} # display name -> top-k SVDResult of the previous analysis (warm start)
        self.switches = {"to_lowrank": 0, "to_full": 0}
        self.metrics_log = None

    # -- setup -------------------------------------------------------------------------------
    def prepare_model(self, model):
        for display, prefix, b, path in resolve_targets(model, self.cfg.adaptive_svd_target_layer, self.cfg.svd_targets):
            module = _swap_in(model.transformer.h[b], path)
            module.protect = self.cfg.svd_protect == "project"
            self.layers[display] = (prefix, module)
            self.states[display] = asvd.LayerSVDState()
        print0(f"Adaptive SVD: {len(self.layers)} target layer(s): {', '.join(self.layers)}; interval {self.cfg.svd_interval}, "
               f"method {self.cfg.svd_method}, protect {self.cfg.svd_protect}")

    def attach(self, run):
        self.run = run
        self.compiling = run.cfg.compile == "true" or (run.cfg.compile == "auto" and run.device.type == "cuda")
        if self.compiling:
            # let the factor shapes be dynamic, so a new r re-uses the compiled graph
            torch._dynamo.config.force_parameter_static_shapes = False
        # rank 0 writes it; the loop empties it (fresh run) or drops rows after the checkpoint (resume)
        self.metrics_log = run.jsonl("svd_metrics.jsonl")
        self.distributed = run.world_size > 1 and dist.is_initialized()
        self.owner = assign_owners(self.layers, run.world_size if self.distributed else 1)
        if self.distributed:
            per_rank = [sum(1 for o in self.owner.values() if o == r) for r in range(run.world_size)]
            print0(f"Adaptive SVD: analysis spread over {run.world_size} ranks by layer (layers per rank: "
                   f"{', '.join(map(str, per_rank))}); factors and decisions broadcast to every rank")

    # -- every step --------------------------------------------------------------------------
    def after_backward(self, step, last_step):
        if self.cfg.svd_protect == "project":
            for _, module in self.layers.values():
                module.project_factor_grads()
        if step % self.cfg.svd_interval == 0 or last_step:
            self.analyze(step)

    # -- the analysis ------------------------------------------------------------------------
    def analyze(self, step):
        """One analysis of every target layer. Two phases, so that ranks can share the work:
        plan (SVD, metrics, decision; changes nothing) on the layer's owner rank, then the plans are
        exchanged and every rank applies every plan (switch, re-split, state), so all ranks hold the
        same factors, momentum and state. Every rank enters the same collectives whatever happens
        inside a plan: a failed SVD is a plan that skips the layer, an exception is sent as an error
        that all ranks raise together."""
        t0 = time.time()
        print0(f"=== SVD Analysis at step {step} ===")
        rank = self.run.rank if self.distributed else 0
        plans = {}
        for display, (_, module) in self.layers.items():
            if self.run.stop_requested():
                break  # a stop signal: leave the rest; stop_check() below stops every rank together
            if self.owner[display] == rank:
                t_layer = time.perf_counter()
                try:
                    plans[display] = self._plan_layer(step, display, module)
                except Exception as e:  # a bug, not a numerical failure: all ranks must still meet below
                    traceback.print_exc()
                    plans[display] = {"error": f"{type(e).__name__}: {e}"}
                plans[display]["seconds"] = time.perf_counter() - t_layer
        # planning changed nothing, so a stop here abandons the analysis without a trace
        self.run.stop_check()
        if self.distributed:
            plans = self._exchange(plans)
        for display, plan in plans.items():
            if "error" in plan:
                raise RuntimeError(f"adaptive SVD analysis of {display} failed on rank {self.owner[display]}: {plan['error']}")
        if self.distributed:
            # next time, balance the ranks by what each layer really cost (shapes, exact vs warm SVD,
            # low-rank layers needing every triple); all ranks have the same numbers, so the same map
            self.owner = assign_owners(self.layers, self.run.world_size, {d: p["seconds"] for d, p in plans.items()})
        for display, (prefix, module) in self.layers.items():
            plan = plans[display]
            self._apply_plan(display, prefix, module, plan)
            for line in plan["lines"]:
                print0(line)
            self._log(step, display, plan["record"])
        print0(f"=== SVD Analysis complete === ({(time.time() - t0) * 1000:.0f} ms)")

    def _exchange(self, local):
        """All ranks get every layer's plan: the small parts through one all_gather_object, the SVD
        tensors through one broadcast per owner rank (sizes known to all from the gathered parts)."""
        metas = {}
        for display, plan in local.items():
            meta = dict(plan)
            res = meta.pop("res", None)
            if res is not None:
                meta["res_meta"] = {"shapes": [tuple(t.shape) for t in (res.U, res.S, res.Vh)], "method": res.method,
                                    "complete": res.complete, "frob_sq": res.frob_sq}
            metas[display] = meta
        gathered = [None] * self.run.world_size
        dist.all_gather_object(gathered, metas)
        plans = {}
        for src in range(self.run.world_size):
            mine = src == self.run.rank
            owned = [d for d in self.layers if self.owner[d] == src and "res_meta" in gathered[src][d]]
            sizes = [math.prod(shape) for d in owned for shape in gathered[src][d]["res_meta"]["shapes"]]
            if sizes:  # the same on every rank, so every rank takes part or none does
                if mine:
                    flat = torch.cat([t.detach().float().reshape(-1) for d in owned
                                      for t in (local[d]["res"].U, local[d]["res"].S, local[d]["res"].Vh)])
                else:
                    flat = torch.empty(sum(sizes), dtype=torch.float32, device=self.run.device)
                dist.broadcast(flat, src=src)
                pieces = iter(torch.split(flat, sizes))
            for display in (d for d in self.layers if self.owner[d] == src):
                plan = gathered[src][display]
                meta = plan.pop("res_meta", None)
                if meta is not None:
                    U, S, Vh = (next(pieces).view(shape) for shape in meta["shapes"])
                    plan["res"] = asvd.SVDResult(U, S, Vh, meta["method"], meta["complete"], meta["frob_sq"])
                plans[display] = plan
        return {d: plans[d] for d in self.layers}

    def _svd(self, display, W, k, complete):
        prev = self.prev_res.get(display)
        method = "exact" if complete or prev is None else self.cfg.svd_method
        return asvd.svd(W, method=method, prev=prev, k=k)

    def _plan_layer(self, step, display, module):
        """SVD, metrics, decision and next r of one layer; changes nothing. Returns the plan: console
        lines, the JSON record, and (unless the layer is skipped) what `_apply_plan` needs."""
        state = self.states[display]
        W = module.effective_weight().detach().float()
        G = module.weight.grad
        G = None if G is None else G.detach().float()
        g = min(W.shape)
        r_prop = state.r
        k = None if r_prop is None else g - r_prop
        # low-rank layers are re-split at every analysis, which needs every singular triple
        res = self._svd(display, W, k, complete=state.mode == "lowrank" or r_prop is None)
        record = {"step": step, "layer": display, "mode": state.mode, "shape": list(W.shape), "svd_method": res.method,
                  "svd_notes": list(res.notes)}
        lines = []
        if res.method == "failed":
            lines.append(f"  [{display}] SVD failed ({res.reason}); layer skipped at this analysis")
            record.update(action="skipped", reason=f"svd_failed: {res.reason}")
            return {"lines": lines, "record": record}
        k_min = self.k_min.get(display)
        if r_prop is None:
            k_min = asvd.choose_k(res.S, self.policy.svd_principal_energy, res.frob_sq, g)
            if k_min is None:  # e.g. a zero-initialised projection that has not moved yet
                lines.append(f"  [{display}] no spectrum yet (||W||_F = {res.frob_sq ** 0.5:.3g}); baseline deferred")
                record.update(action="skipped", reason="zero_matrix")
                return {"lines": lines, "record": record}
            r_prop = asvd.initial_rank(g, k_min)
        dW = None if state.prev_W is None else W - state.prev_W
        B, A = (module.B.detach().float(), module.A.detach().float()) if module.mode == "lowrank" else (None, None)
        metrics = asvd.layer_metrics(res, r_prop, G=G, dW=dW, prev_U_k=state.prev_U_k, prev_minor_S=state.prev_minor_S, B=B, A=A)
        action, reason = asvd.decide(metrics, state, self.policy, step)
        if not state.has_baseline:
            lines.append(f"  [{display}] Initial SVD computed (k_min={k_min}, r={r_prop}, "
                         f"stable_rank={_fmt(metrics['stable_rank'], 1)}, effective_rank_95={metrics['effective_rank_95']})")
        else:
            lines += self._metric_lines(display, state.mode, metrics)
        r_max = g - k_min
        r_next = asvd.next_rank(r_prop, metrics["minor_spectrum_change"], r_min=min(self.policy.svd_rank_min, r_max),
                                r_max=r_max, decay=self.policy.svd_rank_decay, tol=self.policy.svd_minor_change_tol)
        if action == asvd.TO_LOWRANK and not res.complete:
            complete = asvd.svd(W, method="exact")
            if complete.method == "failed":
                action, reason = asvd.KEEP, f"svd_failed: {complete.reason}"
            else:
                res = complete
        if action == asvd.TO_LOWRANK:
            lines.append(f"  [{display}] SWITCHED TO LOW-RANK (r={r_prop}) - Reason: {reason}")
            r_after, mode_after = r_prop, "lowrank"
        elif action == asvd.TO_FULL:
            lines.append(f"  [{display}] SWITCHED TO FULL MATRIX - Reason: {reason}")
            r_after, mode_after = r_prop, "full"
        else:
            if r_next != r_prop:
                lines.append(f"  [{display}] Updated r: {r_prop} -> {r_next}")
            r_after, mode_after = r_next, state.mode
        if action == asvd.KEEP and reason != "initial_svd_baseline":
            lines.append(f"  [{display}] Decision: {reason} (mode={mode_after}, r={r_after})")
        # what applying the plan reads of the SVD: every triple to (re-)split, else the top k it keeps
        keep = g if mode_after == "lowrank" else g - r_after
        res = asvd.SVDResult(res.U[:, :keep], res.S, res.Vh[:keep], res.method, res.complete, res.frob_sq)
        n_out, n_in = W.shape
        trainable = n_out * n_in if mode_after == "full" else r_after * (n_out + n_in)
        record.update(metrics, action=action, reason=reason, mode_after=mode_after, r_after=r_after,
                      trainable_params=trainable)
        return {"lines": lines, "record": record, "res": res, "action": action, "metrics": metrics,
                "k_min": k_min, "r_after": r_after}

    def _apply_plan(self, display, prefix, module, plan):
        """Carry out one layer's plan on this rank: switch or re-split, carry momentum, update the state."""
        if "res" not in plan:
            return
        res, action, r_after = plan["res"], plan["action"], plan["r_after"]
        state = self.states[display]
        W = module.effective_weight().detach().float()
        G = module.weight.grad
        G = None if G is None else G.detach().float()
        self.k_min[display] = plan["k_min"]
        if action == asvd.TO_LOWRANK:
            self._switch_to_lowrank(prefix, module, res, r_after, G)
            self.switches["to_lowrank"] += 1
        elif action == asvd.TO_FULL:
            self._switch_to_full(prefix, module)
            self.switches["to_full"] += 1
        elif state.mode == "lowrank":
            self._resplit(prefix, module, res, r_after, G)
        new_state = asvd.advance_state(state, action, plan["metrics"], self.policy)
        k_after = min(W.shape) - r_after
        minor_S = res.S[k_after:].clone() if res.complete else None
        self.states[display] = dataclasses.replace(new_state, r=r_after, prev_U_k=res.U[:, :k_after].clone(),
                                                   prev_W=W.clone(), prev_minor_S=minor_S)
        self.prev_res[display] = asvd.SVDResult(res.U[:, :k_after].clone(), res.S[:k_after].clone(), res.Vh[:k_after].clone(),
                                                res.method, False, res.frob_sq)

    @staticmethod
    def _metric_lines(display, mode, m):
        line = (f"    effective_rank_95={m['effective_rank_95']} effective_rank_99={m['effective_rank_99']} "
                f"stable_rank={_fmt(m['stable_rank'], 2)} minor_spectrum_change={_fmt(m['minor_spectrum_change'])}")
        if m["trainable_fraction"] is not None:
            line += f" trainable_fraction={_fmt(m['trainable_fraction'])} (random {_fmt(m['trainable_fraction_baseline'])})"
        return [
            f"  [{display}] mode={mode} k={m['k']} r={m['r']}",
            f"    gradient: principal_alignment={_fmt(m['principal_alignment'])} minor_alignment={_fmt(m['minor_alignment'])} "
            f"alignment_ratio={_fmt(m['alignment_ratio'], 3)} (random = 1)",
            f"    update:   principal_alignment={_fmt(m['update_principal_alignment'])} minor_alignment={_fmt(m['update_minor_alignment'])} "
            f"alignment_ratio={_fmt(m['update_alignment_ratio'], 3)}",
            f"    subspace_angle={_fmt(m['subspace_angle'])} rad subspace_overlap={_fmt(m['subspace_overlap'])} "
            f"(above chance {_fmt(m['subspace_overlap_above_chance'])}) reconstruction_error={_fmt(m['reconstruction_error'])}",
            line,
        ]

    # -- actions -----------------------------------------------------------------------------
    def _muon_buffer(self, p):
        return self.run.muon.state[p].get("momentum_buffer", torch.zeros_like(p)).float()

    def _install_factors(self, prefix, module, old_params, M_W, G):
        """After module.to_lowrank: give B, A their momentum and this step's gradient, replacing old_params in Muon."""
        B, A = module.B, module.A
        M_B, M_A = asvd.momentum_to_lowrank(M_W, B.detach().float(), A.detach().float())
        if G is not None:
            B.grad = (G @ A.detach().float().T).to(B.dtype)
            A.grad = (B.detach().float().T @ G).to(A.dtype)
        if module.protect_U is not None:
            U_k, V_k = module.protect_U.float(), module.protect_V.float()
            M_B = M_B - U_k @ (U_k.T @ M_B)
            M_A = M_A - (M_A @ V_k) @ V_k.T
            module.project_factor_grads()
        self.run.muon.replace(old_params, [(prefix + ".B", B, M_B), (prefix + ".A", A, M_A)])
        self._mark_dynamic(module)

    def _switch_to_lowrank(self, prefix, module, res, r, G):
        M_W = self._muon_buffer(module.weight)
        weight = module.weight
        module.to_lowrank(res.U, res.S, res.Vh, r)
        self._install_factors(prefix, module, [weight], M_W, G)
        self._compile_reset()

    def _switch_to_full(self, prefix, module):
        B, A = module.B, module.A
        M_W = asvd.momentum_to_full(self._muon_buffer(B), self._muon_buffer(A), B.detach().float(), A.detach().float())
        module.to_full()
        # weight.grad already holds dL/dW_eff, the gradient the full matrix trains on now
        self.run.muon.replace([B, A], [(prefix + ".weight", module.weight, M_W)])
        self._compile_reset()

    def _resplit(self, prefix, module, res, r, G):
        """Re-compute the principal part from the merged W_eff and split at the new r (function preserved)."""
        B, A = module.B, module.A
        M_W = asvd.momentum_to_full(self._muon_buffer(B), self._muon_buffer(A), B.detach().float(), A.detach().float())
        module.to_lowrank(res.U, res.S, res.Vh, r)
        self._install_factors(prefix, module, [B, A], M_W, G)

    def _mark_dynamic(self, module):
        # r changes at every re-split; dynamic factor shapes keep torch.compile from recompiling for each r
        if self.compiling:
            torch._dynamo.mark_dynamic(module.B, 1)
            torch._dynamo.mark_dynamic(module.A, 0)

    def _compile_reset(self):
        # a mode switch changes the module structure: drop compiled graphs once (one recompile per
        # switch event) instead of letting guard failures pile entries up to the recompile limit
        if self.compiling:
            torch._dynamo.reset()

    # -- logging -----------------------------------------------------------------------------
    def _log(self, step, display, record):
        clean = {k: (v.item() if torch.is_tensor(v) else v) for k, v in record.items()}
        self.metrics_log.write(clean)
        data = {f"svd/{display}/{k}": v for k, v in clean.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        data[f"svd/{display}/lowrank"] = int(clean.get("mode_after", clean["mode"]) == "lowrank")
        self.run.log(data, step)

    # -- checkpoint --------------------------------------------------------------------------
    def state_dict(self):
        layers = {}
        for display, (prefix, module) in self.layers.items():
            st = self.states[display]
            entry = {"state": {f.name: getattr(st, f.name) for f in dataclasses.fields(st)},
                     "k_min": self.k_min.get(display), "mode": module.mode}
            prev = self.prev_res.get(display)
            if prev is not None:
                entry["prev_res"] = {"U": prev.U, "S": prev.S, "Vh": prev.Vh, "method": prev.method, "frob_sq": prev.frob_sq}
            if module.mode == "lowrank":
                entry.update(W_p=module.weight.detach().clone(), B=module.B.detach().clone(), A=module.A.detach().clone())
                if module.protect_U is not None:
                    entry.update(protect_U=module.protect_U.clone(), protect_V=module.protect_V.clone())
            layers[display] = entry
        return {"layers": layers, "switches": dict(self.switches)}

    def load_state_dict(self, sd):
        if not sd:
            raise ValueError("the checkpoint has no adaptive-SVD state (was it written by the baseline?)")
        if set(sd["layers"]) != set(self.layers):
            raise ValueError(f"checkpoint analysed layers {sorted(sd['layers'])}, this run targets {sorted(self.layers)}")
        self.switches = dict(sd["switches"])
        for display, entry in sd["layers"].items():
            prefix, module = self.layers[display]
            self.states[display] = asvd.LayerSVDState(**entry["state"])
            if entry["k_min"] is not None:
                self.k_min[display] = entry["k_min"]
            if "prev_res" in entry:
                pr = entry["prev_res"]
                self.prev_res[display] = asvd.SVDResult(pr["U"], pr["S"], pr["Vh"], pr["method"], False, pr["frob_sq"])
            if entry["mode"] == "lowrank":
                weight = module.weight
                with torch.no_grad():
                    module.weight.copy_(entry["W_p"])
                module.B = nn.Parameter(entry["B"].to(weight.device).clone())
                module.A = nn.Parameter(entry["A"].to(weight.device).clone())
                if "protect_U" in entry:
                    module.set_protection(entry["protect_U"].to(weight.device), entry["protect_V"].to(weight.device))
                # momentum placeholders; the optimizer's own state_dict fills them next
                self.run.muon.replace([weight], [(prefix + ".B", module.B, torch.zeros_like(module.B)),
                                                 (prefix + ".A", module.A, torch.zeros_like(module.A))])

    def summary(self):
        modes = {d: m.mode for d, (_, m) in self.layers.items()}
        ranks = {d: m.rank for d, (_, m) in self.layers.items()}
        return {"modes": modes, "ranks": ranks, "switches": dict(self.switches)}
