"""Fingerprint of a tiny fp32 CPU training run: its per-step losses and a hash of its final weights.

`python -m tests.fp32_fingerprint` prints it as JSON; tests/test_precision.py compares it with the
values this printed before the --dtype flag existed, so the fp32 path is known to be unchanged.
"""

import contextlib
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from nanochat.checkpoint_manager import CHECKPOINT_NAME
from nanochat.train import TrainConfig, train

RUN = dict(depth=2, max_seq_len=64, device_batch_size=2, total_batch_size=256, eval_tokens=1024,
           num_iterations=6, eval_every=-1, sample_every=-1, device_type="cpu")


def weights_hash(state_dict):
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode())
        h.update(state_dict[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def fingerprint(output_dir, **overrides):
    """Run RUN (plus `overrides`) on one thread, so the float reductions are the same on every run;
    NANOCHAT_BASE_DIR must hold the data and tokenizer of the tests' prepared base."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = train(TrainConfig(**RUN, **overrides, output_dir=str(output_dir)))
    finally:
        torch.set_num_threads(threads)
    ckpt = torch.load(Path(result["ckpt_dir"]) / CHECKPOINT_NAME, map_location="cpu")
    return {"losses": [x.hex() for x in result["losses"]], "weights_sha256": weights_hash(ckpt["model"]),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


if __name__ == "__main__":
    from tests.conftest import build_prepared_base

    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(sys.stderr):
        base = build_prepared_base(Path(tmp) / "base")
        os.environ["NANOCHAT_BASE_DIR"] = str(base)
        out = fingerprint(Path(tmp) / "run")
    json.dump(out, sys.stdout, indent=1)
    print()
