"""Matmul precision: what `--dtype=auto` picks on this device, and the autocast context for it.

bf16 only pays where the hardware multiplies bf16 natively *and* faster than fp32. On CPUs the flag
alone is not enough: avx512_bf16 without AMX runs bf16 GEMMs no faster (often slower) than fp32, so
`auto` on a CPU with a native bf16 instruction set also times one bf16 and one fp32 matmul and keeps
fp32 unless bf16 is clearly faster. Only matmuls (and Muon's Newton-Schulz) change dtype: weights,
optimizer state, the SVD analysis and every metric stay fp32.
"""

import platform
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

from nanochat.common import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CPU_BF16_FEATURES = ("amx_bf16", "avx512_bf16", "bf16")  # x86 (AMX, AVX-512), aarch64 (FEAT_BF16)
MIN_SPEEDUP = 1.25  # bf16 must beat fp32 by this much: timing noise must not flip the choice


def cpu_bf16_features():
    """The native bf16 instruction sets this CPU reports (Linux /proc/cpuinfo), e.g. ['avx512_bf16']."""
    try:
        with open("/proc/cpuinfo") as f:
            words = set(" ".join(line.split(":", 1)[1] for line in f if line.startswith(("flags", "Features"))).split())
    except OSError:
        return []
    return [name for name in CPU_BF16_FEATURES if name in words]


def bf16_matmul_speedup(device, reps=5):
    """fp32 time / bf16 time of a (512 x 1024) @ (1024 x 2048) matmul (2 GFLOP), best of `reps`,
    the two dtypes interleaved so that load from other processes hits both alike."""
    gen = torch.Generator(device).manual_seed(0)  # the run's own random stream stays untouched
    a = torch.randn(512, 1024, device=device, generator=gen)
    b = torch.randn(1024, 2048, device=device, generator=gen)
    pairs = {dt: (a.to(dt), b.to(dt)) for dt in (torch.float32, torch.bfloat16)}
    best = {dt: float("inf") for dt in pairs}
    for _ in range(reps + 1):  # the first round warms up (kernel selection, weight packing)
        for dt, (x, y) in pairs.items():
            t0 = time.perf_counter()
            torch.mm(x, y)
            best[dt] = min(best[dt], time.perf_counter() - t0)
    return best[torch.float32] / best[torch.bfloat16]


def _decide(device_type):
    """(dtype name, reason) for --dtype=auto on a fresh run."""
    if device_type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bfloat16", "CUDA device with native bf16"
        return "float32", "this CUDA device has no native bf16"
    if device_type == "mps":
        return "float32", "MPS (Apple Silicon) keeps fp32"
    if platform.system() == "Darwin":
        return "float32", "CPU of a Mac keeps fp32"
    features = cpu_bf16_features()
    if not features:
        return "float32", "this CPU has no native bf16 (none of " + ", ".join(CPU_BF16_FEATURES) + ")"
    speedup = bf16_matmul_speedup(torch.device("cpu"))
    measured = f"CPU has {', '.join(features)}; a bf16 matmul measured {speedup:.2f}x the speed of fp32"
    if speedup >= MIN_SPEEDUP:
        return "bfloat16", measured
    return "float32", f"{measured} (bf16 needs >= {MIN_SPEEDUP}x)"


def resolve_dtype(requested, device_type, saved_train_config=None):
    """The matmul dtype of this run and why: 'float32' or 'bfloat16'.

    On --resume (`saved_train_config` = the checkpoint's train_config) the checkpoint's dtype is kept,
    so a resumed run never decides differently; checkpoints from before --dtype existed trained in
    bf16 on CUDA and fp32 elsewhere. Under torchrun rank 0 decides for every rank.
    """
    if requested not in ("auto", *DTYPES):
        raise UserError(f"--dtype must be auto, float32 or bfloat16, not {requested!r}")
    if saved_train_config is not None:
        saved = saved_train_config.get("dtype") or ("bfloat16" if device_type == "cuda" else "float32")
        if requested not in ("auto", saved):
            raise UserError(f"--resume: the checkpoint was trained with --dtype={saved}, not {requested}; "
                            f"use --dtype={saved} or auto to continue exactly")
        return saved, "kept from the checkpoint on --resume"
    if requested != "auto":
        return requested, "--dtype"
    decision = [_decide(device_type)]
    if dist.is_initialized():
        dist.broadcast_object_list(decision, src=0)
    dtype, reason = decision[0]
    return dtype, f"auto: {reason}"


def autocast_for(device_type, dtype):
    """The context that runs the forward's matmuls in `dtype` ('float32': none)."""
    if dtype == "float32":
        return nullcontext()
    return torch.amp.autocast(device_type=device_type, dtype=DTYPES[dtype])
