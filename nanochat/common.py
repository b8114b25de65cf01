"""Shared utilities: base directory, device and process-group setup, logging, running an entry point
so that bad input (nanochat.cli.UserError, importable from here too) is one line."""

import os
import resource
import sys
import time
import urllib.request

import torch
import torch.distributed as dist

from nanochat.cli import UserError


def run_cli(main, argv=None):
    """Run an entry point. Exit status: 0, or a non-zero int that main returns (128 + n for a training run that
    signal n stopped), or a UserError's exit_status (2 unless it says otherwise) with `error: ...` as one line
    on stderr, or 130 for a Ctrl-C that ended the program at once."""
    try:
        status = main(sys.argv[1:] if argv is None else argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_status)
    except KeyboardInterrupt as e:
        print(f"error: interrupted{f' ({e})' if str(e) else ''}", file=sys.stderr)
        sys.exit(130)
    if type(status) is int and status:  # other return values (a report's data) are not statuses
        sys.exit(status)


def first_sentence(e):
    """The first sentence of an exception's message, for a one-line error: never cut mid-word, and for
    torch's weights-only refusal the sentence naming what was refused, not its advice to load unsafely."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()] or [type(e).__name__]
    text = next((line for line in lines if line.startswith("WeightsUnpickler error:")), lines[0])
    end = text.find(". ")
    return text[:end] if end > 0 else text.rstrip(".")


def get_base_dir():
    """Where data, tokenizer and eval bundles live: $NANOCHAT_BASE_DIR, else ~/.cache/nanochat."""
    base = os.environ.get("NANOCHAT_BASE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanochat")
    os.makedirs(base, exist_ok=True)
    return base


def get_dist_info():
    """(is_distributed, rank, local_rank, world_size) from the torchrun environment."""
    if all(k in os.environ for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")):
        return True, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    return False, 0, 0, 1


def is_main_process():
    return get_dist_info()[1] == 0


def print0(*args, **kwargs):
    """print on rank 0 only, flushed so logs stream under SLURM."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


BANNER = r"""
                                                   █████                 █████
                                                  ░░███                 ░░███
 ████████    ██████   ████████    ██████   ██████  ░███████    ██████   ███████
░░███░░███  ░░░░░███ ░░███░░███  ███░░███ ███░░███ ░███░░███  ░░░░░███ ░░░███░
 ░███ ░███   ███████  ░███ ░███ ░███ ░███░███ ░░░  ░███ ░███   ███████   ░███
 ░███ ░███  ███░░███  ░███ ░███ ░███ ░███░███  ███ ░███ ░███  ███░░███   ░███ ███
 ████ █████░░████████ ████ █████░░██████ ░░██████  ████ █████░░████████  ░░█████
░░░░ ░░░░░  ░░░░░░░░ ░░░░ ░░░░░  ░░░░░░   ░░░░░░  ░░░░ ░░░░░  ░░░░░░░░    ░░░░░
"""


def print_banner():
    print0(BANNER)


DEVICE_TYPES = ("cuda", "mps", "cpu")


def autodetect_device_type():
    """Prefer CUDA, then MPS, then CPU."""
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def check_device_type(device_type):
    """Resolve '' to the autodetected type and reject devices this machine does not have."""
    if device_type == "":
        device_type = autodetect_device_type()
        print0(f"Autodetected device type: {device_type}")
    if device_type not in DEVICE_TYPES:
        raise UserError(f"unknown --device_type={device_type!r}; use one of cpu, cuda, mps (or leave it empty to autodetect)")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device_type=cuda but no CUDA device is available; use --device_type=cpu or install a CUDA build of torch")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device_type=mps but MPS is not available on this machine; use --device_type=cpu")
    return device_type


def compute_init(device_type):
    """Seed, precision settings and (under torchrun) the process group. Returns (ddp, rank, local_rank, world_size, device)."""
    torch.manual_seed(42)
    if device_type == "cuda":
        torch.cuda.manual_seed(42)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    ddp, rank, local_rank, world_size = get_dist_info()
    if device_type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device(device_type)
    if ddp and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", device_id=device if device_type == "cuda" else None)
        dist.barrier()
    return ddp, rank, local_rank, world_size, device


def compute_cleanup():
    if dist.is_initialized():
        dist.destroy_process_group()


def peak_memory_mib(device_type):
    """Peak memory of this process: the allocator's peak on CUDA, the process's peak RSS elsewhere."""
    if device_type == "cuda":
        return torch.cuda.max_memory_allocated() / 1024 / 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def device_peak_flops(device):
    """Peak dense bf16 FLOP/s of the accelerator, for MFU. None when unknown (MFU is then not printed)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).lower()
    for key, flops in (("h200", 989e12), ("h100", 989e12), ("a100", 312e12), ("a10g", 125e12), ("l40s", 362e12),
                       ("l4", 121e12), ("4090", 165e12), ("3090", 71e12), ("v100", 125e12), ("a6000", 155e12)):
        if key in name:
            return flops
    return None


def download(url, path, retries=5, backoff=2.0, timeout=60, check=None):
    """Fetch url to path atomically (temp file, then rename), retrying with exponential backoff.
    `check(tmp_path)` may raise to reject a truncated or corrupt download, which is then retried.
    Returns None on success, else the last error (URLError, HTTPError and timeouts are OSErrors)."""
    tmp = path + ".tmp"
    error = None
    for attempt in range(retries):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as f:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
            if check is not None:
                check(tmp)
            os.replace(tmp, path)
            return None
        except Exception as e:  # network errors, and whatever `check` raises for a bad file
            error = e
            if os.path.exists(tmp):
                os.remove(tmp)
    return error
