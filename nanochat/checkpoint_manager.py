"""Checkpoints: one `checkpoint.pt` plus a readable `config.json` per run, written atomically.

`checkpoint["model"]` is a dense state dict that `GPT(GPTConfig(**checkpoint["metadata"]["model_config"]))`
loads strictly; the rest (optimizer state, loop state, data position, RNG, the adaptive-SVD state)
is what `--resume` needs to continue exactly. Everything is plain tensors, dicts, lists and
numbers, so `torch.load(..., weights_only=True)` (the default) reads it.
"""

import json
import os

import torch

from nanochat.common import UserError

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"


def checkpoint_dir(output_dir, model_tag):
    return os.path.join(output_dir, "base_checkpoints", model_tag)


def _atomic_write(path, write):
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(ckpt_dir, checkpoint, config):
    """Write checkpoint.pt and config.json; a crash mid-write leaves the previous files intact."""
    os.makedirs(ckpt_dir, exist_ok=True)
    _atomic_write(os.path.join(ckpt_dir, CHECKPOINT_NAME), lambda f: torch.save(checkpoint, f))
    text = json.dumps(config, indent=2, sort_keys=True).encode()
    _atomic_write(os.path.join(ckpt_dir, CONFIG_NAME), lambda f: f.write(text))


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint or raise a one-line UserError; never returns a half-read object."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train first or check --output_dir/--model_tag")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is corrupt or unreadable ({reason[:120]}); "
                        f"delete it and retrain, or point --model_tag at another run") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt.get("metadata", {}):
        raise UserError(f"checkpoint {path} is missing its model or metadata; it was not written by this project")
    return ckpt
