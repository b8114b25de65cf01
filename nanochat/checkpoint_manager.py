"""Checkpoints: one `checkpoint.pt` plus a readable `config.json` per run, written atomically and verified on load.

`checkpoint["model"]` is a dense state dict that `GPT(GPTConfig(**checkpoint["metadata"]["model_config"]))`
loads strictly; the rest (optimizer state, loop state, data position, RNG, the adaptive-SVD state)
is what `--resume` needs to continue exactly. Everything is plain tensors, dicts, lists and
numbers, so `torch.load(..., weights_only=True)` (the default) reads it.

`checkpoint["checksum"]` is a SHA-256 over the canonical bytes of every other entry (each tensor's
dtype, shape and raw bytes, every plain value's repr, in order), so it survives `torch.load` and
`map_location` but not a flipped byte. `checkpoint["config"]` is the exact content of config.json,
so a crash between the two writes can be repaired from the checkpoint (see nanochat.run_files).
`save_checkpoint` refuses weights or optimizer state with a NaN or infinity (nanochat.health.Diverged),
so the last good checkpoint is never replaced by a diverged one.
"""

import hashlib
import json
import math
import os

import torch

from nanochat.common import UserError, first_sentence, print0
from nanochat.health import Diverged

CHECKPOINT_NAME = "checkpoint.pt"
CONFIG_NAME = "config.json"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format is a zip archive


class WriteFailed(UserError):
    """A file of the run could not be written (or, for `action`, read or removed); carries the path and the OS error."""

    def __init__(self, path, error, action="write"):
        self.path, self.error = path, error
        super().__init__(f"could not {action} {path} ({error.strerror or error})")


def _oserror_in(e):
    """The OSError behind e: torch.save reports a failed write as a RuntimeError raised while handling it."""
    while e is not None:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
    return None


def atomic_write(path, write):
    """Write through `write(file)` to a temp file next to path, fsync, then rename over path: a crash or a
    failed write leaves the previous file intact. Raises WriteFailed (disk full, quota, permission)."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        error = _oserror_in(e)
        if error is None:
            raise
        raise WriteFailed(path, error) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def checkpoint_dir(output_dir, model_tag):
    return os.path.join(output_dir, "base_checkpoints", model_tag)


def config_text(config):
    return json.dumps(config, indent=2, sort_keys=True).encode()


def content_checksum(payload):
    """'sha256:<hex>' over the canonical bytes of a nested structure of dicts, lists, tensors and plain values."""
    h = hashlib.sha256()
    _feed(h, payload)
    return "sha256:" + h.hexdigest()


def _feed(h, obj):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}:".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"{{{len(obj)}:".encode())
        for key, value in obj.items():
            _feed(h, key)
            _feed(h, value)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'[' if isinstance(obj, list) else '('}{len(obj)}:".encode())
        for value in obj:
            _feed(h, value)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


def write_checkpoint(path, checkpoint):
    """Atomically write `checkpoint` (without any old checksum) plus a fresh checksum of it."""
    payload = {k: v for k, v in checkpoint.items() if k != "checksum"}
    payload["checksum"] = content_checksum(payload)
    atomic_write(path, lambda f: torch.save(payload, f))


def save_checkpoint(ckpt_dir, checkpoint, config):
    """Write checkpoint.pt (holding `config` too), then config.json. A crash mid-write leaves the previous
    files intact; a crash between the two leaves config.json one save behind, which --resume repairs.
    Non-finite weights or optimizer state are refused (Diverged) before anything is written."""
    for where, tree in (("model weight", checkpoint["model"]), ("optimizer state", checkpoint.get("optim", {}))):
        bad = _first_nonfinite(tree)
        if bad is not None:
            name, count, total = bad
            raise Diverged(f"refused to save step {checkpoint.get('metadata', {}).get('step', '?')}: its {where} {name} holds "
                           f"{count:,} NaN or infinite values (of {total:,}): training diverged; lower the learning rates "
                           f"and start again")
    try:
        os.makedirs(ckpt_dir, exist_ok=True)
    except OSError as e:
        raise WriteFailed(ckpt_dir, e) from None
    write_checkpoint(os.path.join(ckpt_dir, CHECKPOINT_NAME), {**checkpoint, "config": config})
    text = config_text(config)
    atomic_write(os.path.join(ckpt_dir, CONFIG_NAME), lambda f: f.write(text))


def load_checkpoint(path, map_location="cpu"):
    """Read and verify a checkpoint, or raise a one-line UserError naming the file and what is wrong.

    Verified: the file is a readable torch checkpoint of this project, its checksum matches its content,
    and every model weight and optimizer value is finite. Never writes. Returns the dict without the
    checksum entry. A checkpoint written before checksums existed loads with a printed note."""
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}; train first or check --output_dir/--model_tag")
    fix = "restore a good copy or retrain"
    try:
        with open(path, "rb") as f:
            magic = f.read(len(ZIP_MAGIC))
    except OSError as e:
        raise UserError(f"cannot read checkpoint {path} ({e.strerror})") from None
    if magic != ZIP_MAGIC:
        raise UserError(f"checkpoint {path} is corrupt: it is not a PyTorch checkpoint (no zip header); {fix}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:
        raise UserError(f"cannot read checkpoint {path} ({e.strerror})") from None
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt or truncated ({first_sentence(e)}); {fix}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt.get("metadata", {}):
        raise UserError(f"checkpoint {path} is missing its model or metadata; it was not written by this project")
    stored = ckpt.pop("checksum", None)
    if stored is None:
        print0(f"Note: checkpoint {path} has no checksum (written before checksums were added); loading it unverified")
    elif stored != content_checksum(ckpt):
        raise UserError(f"checkpoint {path} is corrupt: its content does not match the checksum stored in it "
                        f"(changed after it was written, e.g. by a disk or copy error); {fix}")
    for where, tree in (("model weight", ckpt["model"]), ("optimizer state", ckpt.get("optim", {}))):
        bad = _first_nonfinite(tree)
        if bad is not None:
            name, count, total = bad
            raise UserError(f"checkpoint {path} holds non-finite values in {where} {name} ({count:,} of {total:,} "
                            f"are NaN or inf); it cannot be used: {fix}")
    return ckpt


def _first_nonfinite(tree, prefix=""):
    """(dotted name, non-finite count, size) of the first floating tensor or float with NaN/inf, else None."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    elif isinstance(tree, torch.Tensor) and tree.is_floating_point():
        if tree.numel() == 0 or torch.isfinite(torch.stack(torch.aminmax(tree.float()))).all():  # NaN and inf reach min or max
            return None
        return prefix, tree.numel() - int(torch.isfinite(tree).sum()), tree.numel()
    elif isinstance(tree, float) and not math.isfinite(tree):
        return prefix, 1, 1
    else:
        return None
    for key, value in items:
        bad = _first_nonfinite(value, f"{prefix}.{key}" if prefix else str(key))
        if bad is not None:
            return bad
    return None
