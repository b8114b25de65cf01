"""CORE evaluation of a trained base model (DCLM's CORE metric, as upstream nanochat's base eval).

  python -m scripts.base_eval --download_bundle          # once, on a machine with internet (login node)
  python -m scripts.base_eval --model_tag=d4 [--output_dir=.] [--max_per_task=100] [--device_type=cpu]
  torchrun --nproc_per_node=8 -m scripts.base_eval --model_tag=d20

Loads <output_dir>/base_checkpoints/<model_tag>/checkpoint.pt, evaluates every task of
<base>/eval_bundle (base = $NANOCHAT_BASE_DIR, default ~/.cache/nanochat), prints per-task accuracy,
centered accuracy and CORE, and writes core_eval.csv and core_eval.json next to the checkpoint.
"""

import csv
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from nanochat.checkpoint_manager import CHECKPOINT_NAME, checkpoint_dir, load_checkpoint
from nanochat.cli import at_least, flag, one_of, parse_args
from nanochat.common import DEVICE_TYPES, UserError, check_device_type, compute_cleanup, compute_init, first_sentence, print0, run_cli
from nanochat.core_eval import EVAL_BUNDLE_URL, download_bundle, evaluate_core, get_bundle_dir, load_bundle
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import get_tokenizer


@dataclass
class EvalConfig:
    model_tag: str = flag("", "checkpoint folder under <output_dir>/base_checkpoints/; empty = the most recently written one")
    output_dir: str = flag(".", "directory that holds base_checkpoints/")
    max_per_task: int = flag(-1, "examples per task (after the fixed shuffle); -1 = all", at_least(1).or_(-1))
    max_seq_len: int = flag(-1, "keep only the last N tokens of longer prompts; -1 = what the model can forward (as upstream)",
                            at_least(2).or_(-1))
    device_type: str = flag("", "cpu | cuda | mps; empty = autodetect (CUDA > MPS > CPU)", one_of("", *DEVICE_TYPES))
    bundle_dir: str = flag("", "eval bundle folder; empty = $NANOCHAT_BASE_DIR/eval_bundle")
    download_bundle: bool = flag(False, "download and unzip the eval bundle (needs internet), then exit")
    bundle_url: str = flag("", f"where --download_bundle fetches from; empty = $NANOCHAT_EVAL_BUNDLE_URL, else {EVAL_BUNDLE_URL}")
    download_retries: int = flag(5, "tries before --download_bundle gives up", at_least(1))


def find_model_tag(output_dir):
    root = os.path.join(output_dir, "base_checkpoints")
    tags = [t for t in (os.listdir(root) if os.path.isdir(root) else [])
            if os.path.isfile(os.path.join(root, t, CHECKPOINT_NAME))]
    if not tags:
        raise UserError(f"no checkpoints under {root}; train first or pass --output_dir/--model_tag")
    return max(tags, key=lambda t: os.path.getmtime(os.path.join(root, t, CHECKPOINT_NAME)))


def load_model(ckpt_dir, device, tokenizer):
    ckpt = load_checkpoint(os.path.join(ckpt_dir, CHECKPOINT_NAME))
    meta = ckpt["metadata"]
    try:
        config = GPTConfig(**meta["model_config"])
        if config.vocab_size != tokenizer.get_vocab_size():
            raise UserError(f"the checkpoint's vocabulary has {config.vocab_size:,} tokens but the tokenizer in the base dir has "
                            f"{tokenizer.get_vocab_size():,}; point NANOCHAT_BASE_DIR at the one it was trained with")
        with torch.device("meta"):
            model = GPT(config)
        model.to_empty(device=device)
        model.init_weights()  # fills the rotary tables; the weights come from the checkpoint
        model.load_state_dict(ckpt["model"], strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise UserError(f"checkpoint in {ckpt_dir} does not match the model ({first_sentence(e)})") from None
    model.eval()
    return model, meta


def write_results(ckpt_dir, out, meta, cfg, model_tag):
    csv_path = os.path.join(ckpt_dir, "core_eval.csv")
    with open(csv_path + ".tmp", "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "accuracy", "centered", "random_baseline", "examples"])
        for label, acc in out["results"].items():
            w.writerow([label, f"{acc:.6f}", f"{out['centered_results'][label]:.6f}",
                        out["random_baselines"][label], out["examples"][label]])
        w.writerow(["CORE", "", f"{out['core_metric']:.6f}", "", ""])
    os.replace(csv_path + ".tmp", csv_path)
    json_path = os.path.join(ckpt_dir, "core_eval.json")
    record = {"model_tag": model_tag, "step": meta.get("step"), "max_per_task": cfg.max_per_task,
              "max_seq_len": cfg.max_seq_len, **out}
    with open(json_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
    os.replace(json_path + ".tmp", json_path)
    return csv_path, json_path


def main(argv):
    cfg = parse_args(EvalConfig, argv, prog="python -m scripts.base_eval", description=__doc__)
    bundle_dir = get_bundle_dir(cfg.bundle_dir or None)
    if cfg.download_bundle:
        download_bundle(bundle_dir, url=cfg.bundle_url or None, retries=cfg.download_retries)
        return
    device_type = check_device_type(cfg.device_type)
    tasks = load_bundle(bundle_dir, cfg.max_per_task)  # before anything slow: a missing bundle is a one-line error
    tokenizer = get_tokenizer()
    model_tag = cfg.model_tag or find_model_tag(cfg.output_dir)
    ckpt_dir = checkpoint_dir(cfg.output_dir, model_tag)
    ddp, rank, local_rank, world_size, device = compute_init(device_type)
    model, meta = load_model(ckpt_dir, device, tokenizer)
    print0(f"Model: {ckpt_dir} (step {meta.get('step')}), CORE bundle: {bundle_dir}, ranks: {world_size}")
    autocast = torch.amp.autocast(device_type="cuda", dtype=torch.bfloat16) if device_type == "cuda" else nullcontext()
    with autocast:
        out = evaluate_core(model, tokenizer, device, tasks=tasks,
                            max_seq_len=cfg.max_seq_len if cfg.max_seq_len > 0 else None)
    if rank == 0:
        print0("=" * 80)
        print0(f"{'Task':<35} {'Accuracy':>10} {'Centered':>10}")
        for label, acc in out["results"].items():
            print0(f"{label:<35} {acc:>10.4f} {out['centered_results'][label]:>10.4f}")
        print0(f"CORE metric: {out['core_metric']:.4f}")
        csv_path, json_path = write_results(ckpt_dir, out, meta, cfg, model_tag)
        print0(f"Wrote {csv_path} and {json_path}")
    compute_cleanup()


if __name__ == "__main__":
    run_cli(main)
