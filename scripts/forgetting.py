"""Forgetting experiment: train on domain A, continue on domain B, measure what A loses.

For each variant (baseline, adaptive = default policy, static = every target protected from the
first step on, --svd_policy=static):
  phase A: a fresh run on --data_a for --steps_a steps          -> <out>/base_checkpoints/<variant>_A/
  phase B: that checkpoint continued (--resume) on --data_b for --steps_b more steps, starting at the
           beginning of B's data, with the optimizer and adaptive-SVD state carried over
                                                                 -> <out>/base_checkpoints/<variant>_B/
During phase B, A's and B's validation bpb are measured on their own val shards every --measure_every
B-steps (the first point is before any B update, the last after the final one). Everything else is one
set of training flags shared by all variants (given after the script's own flags).

    python -m scripts.forgetting --data_a=DIR_A --data_b=DIR_B --steps_a=800 --steps_b=400 \\
        --out=/tmp/forget -- --depth=4 --max_seq_len=256 --device_batch_size=1 --total_batch_size=256 \\
        --eval_tokens=32768 --device_type=cpu --adaptive_svd_target_layer=-1 --svd_targets=attn --svd_interval=50

Writes <out>/forgetting.json (every measurement, per variant) and <out>/forgetting.md (the table).
A variant whose files are complete is not run again (so an interrupted experiment continues).
"""

import dataclasses
import json
import os
import time

from nanochat.adaptive_cycle import AdaptiveConfig, AdaptiveSVDHook
from nanochat.checkpoint_manager import CHECKPOINT_NAME, CONFIG_NAME, checkpoint_dir, load_checkpoint, write_checkpoint
from nanochat.cli import flag, parse_args, passthrough, required
from nanochat.common import UserError, run_cli
from nanochat.dataloader import DataLoader
from nanochat.dataset import list_shards
from nanochat.loss_eval import evaluate_bpb
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from nanochat.train import TrainHook, train
from scripts.run_logs import read_jsonl

VARIANTS = {"baseline": {"adaptive_svd": False}, "adaptive": {"adaptive_svd": True, "svd_policy": "adaptive"},
            "static": {"adaptive_svd": True, "svd_policy": "static"}}
OWN_FLAGS = ("data_a", "data_b", "steps_a", "steps_b", "out", "variants", "measure_every")


@dataclasses.dataclass
class ForgettingConfig:
    data_a: str = required("domain A's data dir (train + val shards)")
    data_b: str = required("domain B's data dir")
    steps_a: int = required("optimizer steps on A")
    steps_b: int = required("further optimizer steps on B")
    out: str = required("output dir (checkpoints, forgetting.json, forgetting.md)")
    variants: str = flag(",".join(VARIANTS), f"comma list of {', '.join(VARIANTS)}")
    measure_every: int = flag(100, "measure A and B val bpb every N steps of phase B")
    train_flags: list[str] = passthrough("flags of scripts.base_train_adaptive_svd, shared by every variant")


class MeasureHook(TrainHook):
    """Wraps a run's hook; evaluates bpb on extra validation sets at chosen steps of the run.

    `points` are optimizer-step counts: the measurement for point s sees the weights after s updates.
    A point inside the loop is taken when update s+1 starts (after_backward of step s+1, before its
    optimizer step; only no-grad forward passes, so the gradients are untouched); the run's last step is
    measured by `measure_now` after train() returns.
    """

    def __init__(self, inner, val_sets, points, eval_tokens):
        self.inner = inner
        self.name = inner.name
        self.val_sets = val_sets  # label -> data dir
        self.points = set(points)
        self.eval_tokens = eval_tokens
        self.records = []

    def prepare_model(self, model):
        self.inner.prepare_model(model)

    def attach(self, run):
        self.run = run
        self.inner.attach(run)

    def after_backward(self, step, last_step):
        if step - 1 in self.points:
            self.measure_now(step - 1)
        self.inner.after_backward(step, last_step)

    def measure_now(self, step):
        run, cfg = self.run, self.run.cfg
        tokenizer, token_bytes = get_tokenizer(), get_token_bytes()
        steps = max(1, self.eval_tokens // (cfg.device_batch_size * cfg.max_seq_len))
        record = {"step": step}
        was_training = run.model.training
        run.model.eval()
        for label, data_dir in self.val_sets.items():
            loader = DataLoader(tokenizer, cfg.device_batch_size, cfg.max_seq_len, "val", run.device, data_dir=data_dir)
            record[f"{label}_val_bpb"] = evaluate_bpb(run.model, loader, steps, token_bytes)
            record[f"{label}_val_shard"] = loader.paths[0]
        run.model.train(was_training)
        self.records.append(record)
        print(f"[forgetting] step {step}: " + " ".join(f"{k}={v:.4f}" for k, v in record.items() if k.endswith("bpb")), flush=True)
        return record

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)

    def summary(self):
        return self.inner.summary()


def measure_points(steps_a, steps_b, every):
    """Step counts (absolute) at which phase B measures: before B, every `every` B-steps, after B."""
    return sorted({steps_a + s for s in range(0, steps_b, every)} | {steps_a + steps_b})


def start_phase_b(dir_a, dir_b):
    """Copy phase A's checkpoint into phase B's folder with the data position cleared: B starts at its beginning."""
    ckpt = load_checkpoint(os.path.join(dir_a, CHECKPOINT_NAME))
    ckpt["loop"]["dataloader"] = [None] * len(ckpt["loop"]["dataloader"])
    ckpt["loop"].update(val_step=None, pending_row=None)  # B validates on its own data from its first step
    ckpt.pop("config", None)  # A's config.json; B writes its own at its first save
    os.makedirs(dir_b, exist_ok=True)
    write_checkpoint(os.path.join(dir_b, CHECKPOINT_NAME), ckpt)
    for name in (CONFIG_NAME, "svd_metrics.jsonl", "train_metrics.jsonl"):  # B's metrics go to files of their own
        path = os.path.join(dir_b, name)
        if os.path.exists(path):
            os.remove(path)


def make_config(train_argv, overrides):
    cfg = parse_args(AdaptiveConfig, train_argv, prog="python -m scripts.forgetting -- [training flags]", description=__doc__)
    return dataclasses.replace(cfg, **overrides)


def write_command(cfg):
    """command.txt in the run folder: the equivalent single-run command (read by scripts.monitor_svd)."""
    run_dir = checkpoint_dir(cfg.output_dir, cfg.model_tag)
    os.makedirs(run_dir, exist_ok=True)
    flags = " ".join(f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items() if v != "")
    with open(os.path.join(run_dir, "command.txt"), "w") as f:
        f.write(f"python -m scripts.base_train_adaptive_svd {flags}\n")


def _check_finished(res, phase):
    if res["stopped_by_signal"] is not None or res["step"] != res["num_iterations"]:
        raise UserError(f"phase {phase} stopped by signal {res['stopped_by_signal']} at step {res['step']}; "
                        f"run the same command again to repeat this variant")


def run_variant(name, args, train_argv):
    tags = {p: f"{name}_{p}" for p in "AB"}
    val_sets = {"A": args.data_a, "B": args.data_b}
    t0 = time.time()
    # phase A
    cfg_a = make_config(train_argv, dict(VARIANTS[name], data_dir=args.data_a, num_iterations=args.steps_a,
                                         output_dir=args.out, model_tag=tags["A"], resume=False, overwrite=True))
    write_command(cfg_a)
    res_a = train(cfg_a, hook=AdaptiveSVDHook(cfg_a) if cfg_a.adaptive_svd else None, default_tag=tags["A"])
    time_a = time.time() - t0
    _check_finished(res_a, "A")
    # phase B
    dir_a, dir_b = checkpoint_dir(args.out, tags["A"]), checkpoint_dir(args.out, tags["B"])
    start_phase_b(dir_a, dir_b)
    cfg_b = make_config(train_argv, dict(VARIANTS[name], data_dir=args.data_b, num_iterations=args.steps_a + args.steps_b,
                                         output_dir=args.out, model_tag=tags["B"], resume=True))
    write_command(cfg_b)
    inner = AdaptiveSVDHook(cfg_b) if cfg_b.adaptive_svd else TrainHook()
    points = measure_points(args.steps_a, args.steps_b, args.measure_every)
    hook = MeasureHook(inner, val_sets, points, cfg_b.eval_tokens)
    res_b = train(cfg_b, hook=hook, default_tag=tags["B"])
    _check_finished(res_b, "B")
    hook.measure_now(res_b["step"])
    first, last = hook.records[0], hook.records[-1]
    return {
        "variant": name, "flags": VARIANTS[name], "dir_a": dir_a, "dir_b": dir_b,
        "phase_a_final_val_bpb": res_a["val_bpb"], "phase_a_time_s": time_a,
        "phase_b_time_s": time.time() - t0 - time_a, "phase_a_losses": res_a["losses"], "phase_b_losses": res_b["losses"],
        "curve": hook.records,
        "a_bpb_before": first["A_val_bpb"], "a_bpb_after": last["A_val_bpb"],
        "forgetting": last["A_val_bpb"] - first["A_val_bpb"],
        "b_bpb_before": first["B_val_bpb"], "b_bpb_after": last["B_val_bpb"],
        "b_learning": first["B_val_bpb"] - last["B_val_bpb"],
        "phase_a_svd": svd_phase_summary(os.path.join(dir_a, "svd_metrics.jsonl")),
        "phase_b_svd": svd_phase_summary(os.path.join(dir_b, "svd_metrics.jsonl")),
    }


def svd_phase_summary(jsonl_path):
    """What the analyses of a phase did: counts, switches, mean metrics (None for the baseline)."""
    if not os.path.exists(jsonl_path):
        return None
    recs = [r for r in read_jsonl(jsonl_path) if "mode_after" in r]
    if not recs:
        return None

    def mean(key):
        vals = [r[key] for r in recs if isinstance(r.get(key), (int, float))]
        return sum(vals) / len(vals) if vals else None

    return {"analyses": len(recs), "lowrank_share": sum(r["mode_after"] == "lowrank" for r in recs) / len(recs),
            "to_lowrank": sum(r["action"] == "to_lowrank" for r in recs), "to_full": sum(r["action"] == "to_full" for r in recs),
            "reasons": sorted({r["reason"] for r in recs if r["action"] != "keep"}),
            **{f"mean_{k}": mean(k) for k in ("alignment_ratio", "update_alignment_ratio", "subspace_overlap",
                                              "subspace_angle", "reconstruction_error", "blocked_fraction", "r_after")}}


def fmt(x, digits=4):
    return "n/a" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def markdown(results, command):
    lines = [f"Command: `{command}`", "",
             "| variant | A bpb after A | A bpb before B | A bpb after B | forgetting (A increase) | B bpb before B | "
             "B bpb after B | B learning (B decrease) | phase B low-rank share | phase B switches to low / to full |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        s = r["phase_b_svd"] or {}
        lines.append(f"| {r['variant']} | {fmt(r['phase_a_final_val_bpb'])} | {fmt(r['a_bpb_before'])} | {fmt(r['a_bpb_after'])} | "
                     f"{r['forgetting']:+.4f} | {fmt(r['b_bpb_before'])} | {fmt(r['b_bpb_after'])} | {r['b_learning']:+.4f} | "
                     f"{fmt(s.get('lowrank_share'), 2)} | {s.get('to_lowrank', 'n/a')} / {s.get('to_full', 'n/a')} |")
    lines += ["", "SVD analyses per phase (means over all layer-analyses of the phase):", "",
              "| variant | phase | analyses | low-rank share | to low / to full | reasons | alignment ratio (grad) | "
              "alignment ratio (update) | subspace overlap | subspace angle | blocked fraction | mean r |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for phase in ("a", "b"):
            s = r.get(f"phase_{phase}_svd")
            if not s:
                continue
            lines.append(f"| {r['variant']} | {phase.upper()} | {s['analyses']} | {fmt(s['lowrank_share'], 2)} | {s['to_lowrank']} / {s['to_full']} | "
                         f"{', '.join(s['reasons']) or '-'} | {fmt(s['mean_alignment_ratio'], 3)} | {fmt(s['mean_update_alignment_ratio'], 3)} | "
                         f"{fmt(s['mean_subspace_overlap'], 3)} | {fmt(s['mean_subspace_angle'], 3)} | {fmt(s['mean_blocked_fraction'], 3)} | "
                         f"{fmt(s['mean_r_after'], 1)} |")
    return "\n".join(lines) + "\n"


def parse_own(argv):
    args = parse_args(ForgettingConfig, argv, prog="python -m scripts.forgetting", description=__doc__)
    train_argv = args.train_flags
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise UserError(f"--variants: unknown {bad}; use {', '.join(VARIANTS)}")
    if args.steps_a < 1 or args.steps_b < 1 or args.measure_every < 1:
        raise UserError("--steps_a, --steps_b and --measure_every must be >= 1")
    for key in ("data_dir", "num_iterations", "model_tag", "output_dir", "resume", "overwrite", "adaptive_svd", "svd_policy"):
        if any(a.lstrip("-").replace("-", "_").split("=")[0] == key for a in train_argv):
            raise UserError(f"--{key} is set by the forgetting experiment itself; leave it out of the training flags")
    for d in (args.data_a, args.data_b):
        list_shards(d, "train"), list_shards(d, "val")
    make_config(train_argv, {})  # fail early on a bad training flag
    return args, variants, train_argv


def main(argv):
    args, variants, train_argv = parse_own(argv)
    command = "python -m scripts.forgetting " + " ".join(argv)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "forgetting.json")
    done = {}
    if os.path.exists(json_path):
        prev = json.load(open(json_path))
        if prev.get("train_argv") == train_argv and all(prev.get(k) == getattr(args, k) for k in ("data_a", "data_b", "steps_a", "steps_b", "measure_every")):
            done = {r["variant"]: r for r in prev["results"]}
    results = []
    for name in variants:
        result = done.get(name) or run_variant(name, args, train_argv)
        results.append(result)
        with open(json_path, "w") as f:
            json.dump({"command": command, "train_argv": train_argv, **{k: getattr(args, k) for k in OWN_FLAGS},
                       "results": results + [done[v] for v in done if v not in [r["variant"] for r in results]]}, f, indent=1)
    table = markdown(results, command)
    with open(os.path.join(args.out, "forgetting.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    run_cli(main)
