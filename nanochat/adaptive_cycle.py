"""The adaptive-SVD analysis cycle: ties the pure method (nanochat/adaptive_svd.py) to a live run.

Every `svd_interval` steps (and at the last step), between backward and the optimizer step, each
target layer is analysed (spectrum, learned directions, metrics against the previous analysis'
basis, a decision from the rule table) and then enters protected (low-rank) mode, leaves it, or
refreshes its basis. Nothing structural changes: a switch sets or clears the layer's protection
basis and, on entry, projects its Muon momentum once; parameters, optimizer groups and compiled
graphs stay as they are. One record per layer holds its state. Logs go to the console, to
`svd_metrics.jsonl` next to the checkpoint and to wandb; the records go into the checkpoint.
"""

import contextlib
import dataclasses
import math
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from nanochat import adaptive_batch, adaptive_svd as asvd
from nanochat.adaptive_svd import Action, Mode
from nanochat.cli import Check, at_least, between, check_config, flag, one_of
from nanochat.common import UserError, print0
from nanochat.gpt import AdaptiveSVDLinear
from nanochat.hooks import TrainHook
from nanochat.host_sync import HostSyncs
from nanochat.train import TrainConfig

ATTN = ("c_q", "c_k", "c_v", "c_proj")
MLP = ("c_fc", "mlp.c_proj")
TARGET_NAMES = ATTN + MLP + ("mlp.c_fc", "attn.c_proj")
SVD_METRICS = "svd_metrics.jsonl"  # one row per layer-analysis, next to the checkpoint
TARGET_GROUPS = {"attn": ATTN, "mlp": MLP, "all": ATTN + MLP}


def _target_items(targets):
    return [t.strip() for t in targets.split(",") if t.strip()]


TARGETS = Check(lambda v: bool(_target_items(v)) and all(t in TARGET_NAMES or t in TARGET_GROUPS for t in _target_items(v)),
                "a comma list of c_q, c_k, c_v, c_proj, c_fc, mlp.c_proj, attn, mlp or all")


@dataclass
class AdaptiveConfig(asvd.SVDPolicy, TrainConfig):
    """The training flags, every policy threshold (declared once, in adaptive_svd.SVDPolicy) and these."""
    adaptive_svd: bool = flag(True, "run the adaptive SVD analysis and switching (false = plain baseline loop)")
    adaptive_svd_target_layer: int = flag(0, "block index whose matrices are analysed; -1 = all blocks", at_least(0).or_(-1))
    svd_targets: str = flag("c_q", "comma list of matrices: c_q,c_k,c_v,c_proj (attention), c_fc, mlp.c_proj, "
                                   "or attn / mlp / all", TARGETS)
    svd_interval: int = flag(20, "analyse every N steps (and at the last step)", at_least(1))
    svd_method: str = flag("auto", "exact | warm | auto (exact for small matrices, certified warm-started "
                                   "subspace iteration for large ones)", one_of("exact", "warm", "auto"))
    svd_embed_frac: float = flag(0.0, "static protection of the token embedding and lm_head (trained by AdamW): the top "
                                      "fraction of their g = min(n_out, n_in) singular directions in the weights the run "
                                      "starts from (--init_from) stay exact singular triples, every AdamW step's change "
                                      "being projected onto the minor subspace; 0 = off", between(0, 1, open_hi=True))

    # rules between flags (nanochat.cli.check_config); -1 = depth 20 on CUDA, whose blocks prepare_model checks
    CHECKS = (
        (lambda c: c.depth == -1 or c.adaptive_svd_target_layer < c.depth,
         "--adaptive_svd_target_layer={adaptive_svd_target_layer} is out of range for --depth={depth}: use a block "
         "index below the depth, or -1 for every block"),
        (lambda c: c.svd_embed_frac == 0 or bool(c.init_from),
         "--svd_embed_frac={svd_embed_frac} protects what the weights of --init_from learned; a fresh start has learned "
         "nothing to protect: give --init_from"),
    )


def policy_from(cfg):
    return asvd.SVDPolicy(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(asvd.SVDPolicy)})


def target_names(targets):
    """The matrix paths inside a block named by --svd_targets (checked by its flag), in order, without repeats."""
    names = []
    for item in _target_items(targets):
        for name in TARGET_GROUPS.get(item, (item,)):
            names.append(name if "." in name else ("mlp." + name if name == "c_fc" else "attn." + name))
    return list(dict.fromkeys(names))


def target_blocks(target_layer, n_layer):
    if target_layer == -1:
        return list(range(n_layer))
    if 0 <= target_layer < n_layer:
        return [target_layer]
    raise UserError(f"--adaptive_svd_target_layer={target_layer} is out of range for depth {n_layer}; "
                    f"use 0..{n_layer - 1} or -1")


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


def _fmt_p(p):
    return "n/a" if p is None else f"{p:.2e}"


def _clamp_note(m):
    return f" (clamped from {m['k_learned']})" if m.get("k_clamped") else ""


def assign_owners(layers, world_size):
    """{name: rank that analyses it}: the costliest layers first, each to the least-loaded rank.
    Cost: the seconds the layer's analysis took last time when known (the same on every rank), else
    n_out * n_in * min(n_out, n_in). Deterministic, so every rank gets the same map."""
    def cost(layer):
        if layer.seconds is not None:
            return layer.seconds
        n_out, n_in = layer.module.weight.shape
        return n_out * n_in * min(n_out, n_in)

    load = [0.0] * world_size
    owner = {}
    for i, layer in sorted(enumerate(layers.values()), key=lambda item: (-cost(item[1]), item[0])):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[layer.name] = rank
        load[rank] += cost(layer)
    return owner


@dataclass
class Layer:
    """One target layer: its module and everything the cycle tracks for it."""
    name: str                       # display name, e.g. block0.attn.c_q
    module: AdaptiveSVDLinear
    state: asvd.LayerState = field(default_factory=asvd.LayerState)
    seconds: float | None = None    # what its last analysis cost (balances the ranks)


# the tensors of a plan (fields of asvd.Analysis), sent from the analysing rank to every other rank
PLAN_TENSORS = ("U_k", "S_k", "V_k", "warm_V")


@dataclass
class Plan:
    """What the rank that analysed a layer sends to every rank: the log lines, the JSON record, and
    (unless the analysis failed) the decision and the basis it chose."""
    lines: list
    record: dict
    action: Action | None = None
    streaks: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # the layer's alignment history (the shift reading's normal)
    tensors: dict = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


class AdaptiveSVDHook(TrainHook):
    name = "adaptive_svd"

    def __init__(self, cfg):
        check_config(cfg)
        self.cfg = cfg
        self.policy = policy_from(cfg)
        self.layers = {}  # name -> Layer
        self.switches = {Action.TO_LOWRANK.value: 0, Action.TO_FULL.value: 0}
        self.metrics_log = None
        # gpu_check and the benchmarks set it: count this rank's host syncs in each analysis (every torch
        # call then passes through a Python check, which slows the analysis a little)
        self.count_syncs = False
        # the batched analysis (adaptive_batch.analyze_many) on an accelerator, where each host sync stalls a
        # queue; one layer at a time on a CPU, where nothing waits and the batches' copies only cost time.
        # None = by the run's device (attach); tests and benchmarks may set it
        self.batched = None
        self.embed = {}  # --svd_embed_frac: name -> the protected triples {"U_k", "S_k", "V_k"} of that matrix

    # -- setup -------------------------------------------------------------------------------
    def prepare_model(self, model):
        for b in target_blocks(self.cfg.adaptive_svd_target_layer, len(model.transformer.h)):
            for path in target_names(self.cfg.svd_targets):
                module = _swap_in(model.transformer.h[b], path)
                self.layers[f"block{b}.{path}"] = Layer(f"block{b}.{path}", module)
        print0(f"Adaptive SVD: {len(self.layers)} target layer(s): {', '.join(self.layers)}; interval "
               f"{self.cfg.svd_interval}, method {self.cfg.svd_method}, policy {self.policy.svd_policy}")

    def attach(self, run):
        self.run = run
        if self.batched is None:
            self.batched = run.device.type != "cpu"
        # rank 0 writes it; the loop empties it (fresh run) or drops rows after the checkpoint (resume)
        self.metrics_log = run.jsonl(SVD_METRICS)
        self.distributed = run.world_size > 1 and dist.is_initialized()
        self.owner = assign_owners(self.layers, run.world_size if self.distributed else 1)
        if self.distributed:
            per_rank = [sum(1 for o in self.owner.values() if o == r) for r in range(run.world_size)]
            print0(f"Adaptive SVD: analysis spread over {run.world_size} ranks by layer (layers per rank: "
                   f"{', '.join(map(str, per_rank))}); bases and decisions broadcast to every rank")

    # -- every step --------------------------------------------------------------------------
    def analysis_due(self, step, last_step):
        # a run that continues another run's weights (--init_from, e.g. the first step on a new domain)
        # analyses at its first step: the static policy protects there, the others take their baseline
        # from what the weights learned before, so their rules can act from the next analysis on
        first = step == 1 and (self.policy.svd_policy == "static" or bool(self.cfg.init_from))
        return first or last_step or step % self.cfg.svd_interval == 0

    def after_backward(self, step, last_step):
        if step == 1 and self.cfg.svd_embed_frac > 0 and not self.embed:
            self.protect_embeddings()
        if self.analysis_due(step, last_step):
            self.analyze(step)

    def embedding_matrices(self):
        model = self.run.model
        return {"embedding": model.transformer.wte.weight, "lm_head": model.lm_head.weight}

    def protect_embeddings(self):
        """--svd_embed_frac, before the run's first update: the top k = floor(frac * g) singular triples of the token
        embedding and of lm_head, as they come from --init_from, are kept exact by confining AdamW's applied change
        (nanochat.optim.AdamW.confine). k = 0 confines nothing, so the run is then the unprotected one bit for bit.
        Rank 0's bases go to every rank."""
        for name, p in self.embedding_matrices().items():
            W = p.detach().float()
            k = int(self.cfg.svd_embed_frac * min(W.shape))
            if k == 0:
                print0(f"Static protection of {name}: k = 0 of {min(W.shape)} directions, nothing to protect")
                continue
            # once per run, so in float64 on the CPU: bases orthonormal to fp32 rounding keep the triples exact to
            # it too (an fp32 SVD's bases are off by ~1e-6 per entry, and the drift grows with every step's change)
            U, S, Vh = torch.linalg.svd(W.cpu().double(), full_matrices=False)
            triples = {key: t.float().contiguous().to(p.device) for key, t in (("U_k", U[:, :k]), ("S_k", S[:k]), ("V_k", Vh[:k].T))}
            if self.distributed:
                for t in triples.values():
                    dist.broadcast(t, src=0)
            self.embed[name] = triples
            self.run.adamw.confine(p, triples["U_k"], triples["V_k"])
            share = float(S[:k].square().sum() / S.square().sum())
            print0(f"Static protection of {name}: top k = {k} of {min(W.shape)} singular directions ({share:.1%} of "
                   f"||W||^2) stay exact; AdamW's change is confined to the minor subspace")

    # -- the analysis ------------------------------------------------------------------------
    def analyze(self, step):
        """One analysis of every target layer, in two phases so ranks can share the work: plan
        (analysis and decision; changes nothing) on the layer's owner rank, then the plans are
        exchanged and every rank applies every plan, so all ranks hold the same bases, momentum and
        state. Every rank enters the same collectives whatever happens inside a plan: a failed SVD
        is a plan that skips the layer, an exception is sent as an error all ranks raise together."""
        t0 = time.perf_counter()
        print0(f"=== SVD Analysis at step {step} ===")
        rank = self.run.rank if self.distributed else 0
        mine = [layer for layer in self.layers.values() if self.owner[layer.name] == rank]
        plans = {}
        syncs = HostSyncs() if self.count_syncs else contextlib.nullcontext()
        with syncs:  # a stop signal leaves the planning after the current group or layer; stop_check() stops all ranks
            plans = self._plan_all(step, mine)
        # planning changed nothing, so a stop here abandons the analysis without a trace
        self.run.stop_check()
        t_exchange = time.perf_counter()
        if self.distributed:
            plans = self._exchange(plans)
        t_apply = time.perf_counter()
        for name, plan in plans.items():
            if plan.error:
                raise RuntimeError(f"adaptive SVD analysis of {name} failed on rank {self.owner[name]}: {plan.error}")
        self._check_static(plans)
        for layer in self.layers.values():
            plan = plans[layer.name]
            layer.seconds = plan.seconds
            self._apply(layer, plan)
            for line in plan.lines:
                print0(line)
        t_end = time.perf_counter()
        seconds = t_end - t0
        # every row carries its layer's time and the whole analysis' (its exchange and apply stages, and
        # with count_syncs this rank's host syncs), so a reader needs no other file
        whole = dict(analysis_seconds=seconds, exchange_seconds=t_apply - t_exchange,
                     apply_seconds=t_end - t_apply)
        if self.count_syncs:
            whole.update(host_syncs=syncs.count, host_sync_seconds=syncs.seconds)
        for layer in self.layers.values():
            self._log(step, layer.name, dict(plans[layer.name].record, layer_seconds=layer.seconds, **whole))
        if self.distributed:
            # next time, balance the ranks by what each layer really cost; all ranks have the same numbers
            self.owner = assign_owners(self.layers, self.run.world_size)
        print0(f"=== SVD Analysis complete === ({seconds * 1000:.0f} ms)")

    def _check_static(self, plans):
        """The static policy protects what the weights learned before this run: at its first analysis,
        weights in which no target has a learned direction (a fresh run: random init has none) would make
        the whole run the baseline, so it stops (on every rank: every rank holds every plan)."""
        first = [p for n, p in plans.items() if self.layers[n].state.analyses == 0 and p.action is not None]
        if self.policy.svd_policy == "static" and first and not any(p.record.get("k") for p in first):
            raise UserError("--svd_policy=static found no learned direction in any target matrix (k = 0 everywhere): "
                            "static protects what a trained checkpoint learned; continue one with "
                            "--init_from=PATH/checkpoint.pt")

    def _exchange(self, local):
        """All ranks get every layer's plan: the small parts through one all_gather_object, the
        tensors through one broadcast per owner rank (sizes known to all from the gathered parts)."""
        metas = {}
        for name, plan in local.items():
            shapes = {key: tuple(t.shape) for key, t in plan.tensors.items()}
            metas[name] = (dataclasses.replace(plan, tensors={}), shapes)
        gathered = [None] * self.run.world_size
        dist.all_gather_object(gathered, metas)
        plans = {}
        for src in range(self.run.world_size):
            owned = [n for n in self.layers if self.owner[n] == src]
            items = [(n, key, shape) for n in owned for key, shape in gathered[src][n][1].items()]
            if items:  # the same on every rank, so every rank takes part or none does
                sizes = [math.prod(shape) for _, _, shape in items]
                if src == self.run.rank:
                    flat = torch.cat([local[n].tensors[key].detach().float().reshape(-1) for n, key, _ in items])
                else:
                    flat = torch.empty(sum(sizes), dtype=torch.float32, device=self.run.device)
                dist.broadcast(flat, src=src)
                pieces = torch.split(flat, sizes)
            for n in owned:
                plans[n] = gathered[src][n][0]
            for (n, key, shape), piece in zip(items, pieces if items else []):
                plans[n].tensors[key] = piece.view(shape)
        return {n: plans[n] for n in self.layers}

    def _plan_all(self, step, layers):
        """Analyse `layers` (together when batched: same-shape matrices batched on the device, no host sync
        per matrix) and plan each; changes nothing. An exception is every layer's error plan."""
        weights = [layer.module.weight for layer in layers]
        items = [(w.detach().float(), None if w.grad is None else w.grad.detach().float(), layer.state)
                 for w, layer in zip(weights, layers)]
        try:
            with asvd.full_precision(self.run.device.type):  # the metrics and the certificate need fp32, not TF32
                engine = adaptive_batch.analyze_many if self.batched else adaptive_batch.analyze_each
                outs = engine(items, self.policy, step, method=self.cfg.svd_method, stop=self.run.stop_requested)
        except Exception as e:  # a bug, not a numerical failure: all ranks must still meet in analyze()
            traceback.print_exc()
            return {layer.name: Plan([], {}, error=f"{type(e).__name__}: {e}") for layer in layers}
        if outs is None:
            return {}  # a stop signal arrived: analyze() abandons the analysis at its stop_check
        plans = {}
        for layer, out in zip(layers, outs):
            try:
                plans[layer.name] = self._plan(step, layer, out)
            except Exception as e:
                traceback.print_exc()
                plans[layer.name] = Plan([], {}, error=f"{type(e).__name__}: {e}")
            plans[layer.name].seconds = sum(out.seconds.values())
        return plans

    def _plan(self, step, layer, out):
        """One layer's plan from its analysis `out`: the console lines, the JSON record, the decision."""
        state, module = layer.state, layer.module
        W = module.weight
        record = {"step": step, "layer": layer.name, "mode": state.mode, "shape": list(W.shape)}
        if not out.ok:
            record.update(action=Action.SKIPPED, reason=f"svd_failed: {out.failure}", svd_notes=out.notes)
            return Plan([f"  [{layer.name}] SVD failed ({out.failure}); layer skipped at this analysis"], record)
        m, action, reason = out.metrics, out.action, out.reason
        g = min(W.shape)
        mode_after = action.mode_after(state.mode)
        r_before = module.rank
        r_after = g - m["k"] if mode_after == Mode.LOWRANK else g
        lines = []
        if state.analyses == 0 and action == Action.KEEP:
            lines.append(f"  [{layer.name}] Initial SVD computed (k={m['k']}{_clamp_note(m)} learned directions, "
                         f"bulk threshold {_fmt(m['bulk_threshold'])}, s_max={_fmt(m['s_max'])}, "
                         f"stable_rank={_fmt(m['stable_rank'], 1)}, effective_rank_95={_fmt(m['effective_rank_95'])})")
        else:
            lines += self._metric_lines(layer.name, state.mode, m)
        if action == Action.TO_LOWRANK:
            lines.append(f"  [{layer.name}] SWITCHED TO LOW-RANK (r={r_after}) - Reason: {reason}")
        elif action == Action.TO_FULL:
            lines.append(f"  [{layer.name}] SWITCHED TO FULL MATRIX - Reason: {reason}")
        else:
            if mode_after == Mode.LOWRANK and r_after != r_before:
                lines.append(f"  [{layer.name}] Updated r: {r_before} -> {r_after}")
            if state.analyses > 0:
                lines.append(f"  [{layer.name}] Decision: {reason} (mode={mode_after}, r={r_after})")
        record.update(m, action=action, reason=reason, mode_after=mode_after, r_after=r_after,
                      svd_method=out.method, svd_notes=out.notes, **{f"{k}_seconds": v for k, v in out.seconds.items()})
        tensors = {key: getattr(out, key) for key in PLAN_TENSORS}
        return Plan(lines, record, action=action, streaks=out.streaks, history=out.history, tensors=tensors)

    def _apply(self, layer, plan):
        """Carry out one layer's plan on this rank: protect, refresh or release, and the new state."""
        if plan.action is None:
            return
        module, muon = layer.module, self.run.muon
        analysis = asvd.Analysis(action=plan.action, streaks=plan.streaks, history=plan.history, **plan.tensors)
        new_state = asvd.advance(layer.state, analysis, module.weight)
        if new_state.mode == Mode.LOWRANK:
            widened = layer.state.mode == Mode.FULL or new_state.U_k.shape[1] != module.U_k.shape[1]
            module.protect(new_state.U_k, new_state.V_k)
            if widened:  # entering, or new learned directions joined: the momentum leaves them once
                muon.project_momentum(module.weight)
        elif layer.state.mode == Mode.LOWRANK:
            module.unprotect()
        if plan.action in self.switches:
            self.switches[plan.action] += 1
        layer.state = new_state

    @staticmethod
    def _metric_lines(name, mode, m):
        lines = [
            f"  [{name}] mode={mode} k={m['k']}{_clamp_note(m)} (previous {m['k_prev']}) "
            f"bulk_threshold={_fmt(m['bulk_threshold'])} s_max={_fmt(m['s_max'])}",
            f"    gradient: principal_alignment={_fmt(m['principal_alignment'])} minor_alignment={_fmt(m['minor_alignment'])} "
            f"alignment_ratio={_fmt(m['alignment_ratio'], 3)} (random = 1) p={_fmt_p(m['alignment_p'])} "
            f"shift={_fmt(m['alignment_shift'], 2)} (normal = 1) stable_rank={_fmt(m['gradient_stable_rank'], 2)}",
            f"    update:   principal_alignment={_fmt(m['update_principal_alignment'])} "
            f"minor_alignment={_fmt(m['update_minor_alignment'])} alignment_ratio={_fmt(m['update_alignment_ratio'], 3)}",
            f"    subspace_angle={_fmt(m['subspace_angle'])} rad subspace_overlap={_fmt(m['subspace_overlap'])} "
            f"(above chance {_fmt(m['subspace_overlap_above_chance'])}) reconstruction_error={_fmt(m['reconstruction_error'])}",
            f"    effective_rank_95={_fmt(m['effective_rank_95'])} effective_rank_99={_fmt(m['effective_rank_99'])} "
            f"stable_rank={_fmt(m['stable_rank'], 2)}",
        ]
        if m["blocked_fraction"] is not None:
            lines[-1] += (f" blocked_fraction={_fmt(m['blocked_fraction'])} "
                          f"(random {_fmt(m['blocked_fraction_baseline'])})")
        return lines

    # -- logging -----------------------------------------------------------------------------
    def _log(self, step, name, record):
        clean = {k: (v.item() if torch.is_tensor(v) else v) for k, v in record.items()}
        self.metrics_log.write(clean)
        data = {f"svd/{name}/{k}": v for k, v in clean.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        data[f"svd/{name}/{Mode.LOWRANK}"] = int(clean.get("mode_after", clean["mode"]) == Mode.LOWRANK)
        self.run.log(data, step)

    # -- checkpoint --------------------------------------------------------------------------
    def state_dict(self):
        return {"layers": {name: layer.state.to_dict() for name, layer in self.layers.items()},
                "switches": dict(self.switches), "embed": self.embed}

    def load_state_dict(self, sd):
        if not sd:
            raise ValueError("the checkpoint has no adaptive-SVD state (was it written by the baseline?)")
        if set(sd["layers"]) != set(self.layers):
            raise ValueError(f"checkpoint analysed layers {sorted(sd['layers'])}, this run targets {sorted(self.layers)}")
        self.switches = dict(sd["switches"])
        self.embed = {}
        for name, triples in sd.get("embed", {}).items():  # older checkpoints have none
            p = self.embedding_matrices()[name]
            self.embed[name] = {key: t.to(p.device) for key, t in triples.items()}
            self.run.adamw.confine(p, self.embed[name]["U_k"], self.embed[name]["V_k"])
        for name, entry in sd["layers"].items():
            layer = self.layers[name]
            device = layer.module.weight.device
            entry = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in entry.items()}
            layer.state = asvd.LayerState(**entry)
            if layer.state.mode == Mode.LOWRANK:
                layer.module.protect(layer.state.U_k, layer.state.V_k)
            else:
                layer.module.unprotect()

    def summary(self):
        # plain strings: the checkpoint's metadata holds them, and torch.load(weights_only=True) reads no enum
        modes = {name: layer.module.mode.value for name, layer in self.layers.items()}
        ranks = {name: layer.module.rank for name, layer in self.layers.items()}
        return {"modes": modes, "ranks": ranks, "switches": dict(self.switches),
                "embed_protected": {name: int(t["U_k"].shape[1]) for name, t in self.embed.items()}}
