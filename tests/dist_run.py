"""Training-loop runner for tests/test_distributed.py (not a test module itself).

    torchrun --standalone --nproc_per_node=2 tests/dist_run.py --depth=2 ...   # each rank
    DIST_RUN_EMULATE=2 python tests/dist_run.py --depth=2 ...                 # one process, data of 2 ranks

Flags are the adaptive script's (nanochat.adaptive_cycle.AdaptiveConfig); --adaptive_svd=false runs
the plain loop. Each rank writes $DIST_RUN_OUT/rank<r>.json: the SVD records it logged, its step
losses, and a SHA-256 of every weight, protection basis and Muon momentum, so a test can check
that all ranks hold the same state.

DIST_RUN_EMULATE=N (one process only): micro-batch i of a step comes from the loader of rank i % N
of an N-rank run, for validation too. Ranks read disjoint row groups, so this is what makes one
process with N-fold gradient accumulation see exactly the tokens that N ranks see in one step.

Fault injection: DIST_RUN_FAIL_SVD_RANK=r makes every SVD on rank r fail (a numerical failure, which
skips the layers that rank analyses); DIST_RUN_RAISE_RANK=r makes planning raise on rank r (a bug);
DIST_RUN_SLOW_SVD=s makes every SVD take s seconds longer (a long analysis to stop with a signal);
DIST_RUN_SLOW_SAVE=s makes every checkpoint save print `DIST_RUN: saving` and take s seconds longer
(a save to send a second signal into).
Each rank writes its process id to $DIST_RUN_OUT/pid<r> at the start (for tests that signal one rank).
"""

import hashlib
import json
import os
import time

import torch

from nanochat import adaptive_svd as asvd
from nanochat import train as train_module
from nanochat.adaptive_cycle import AdaptiveConfig, AdaptiveSVDHook
from nanochat.cli import parse_args
from nanochat.common import get_dist_info, run_cli
from nanochat.dataloader import DataLoader
from nanochat.hooks import TrainHook
from nanochat.stopping import exit_status

OUT = os.environ.get("DIST_RUN_OUT", ".")
RANK = get_dist_info()[1]


class EmulatedRanksLoader:
    """Round-robin over the loaders of ranks 0..N-1: what N ranks read in one micro-batch each."""

    def __init__(self, tokenizer, B, T, split, device, rank=0, world_size=1, data_dir=None, state=None, **kwargs):
        assert world_size == 1 and state is None, "emulation is for a fresh single-process run"
        n = int(os.environ["DIST_RUN_EMULATE"])
        self.loaders = [DataLoader(tokenizer, B, T, split, device, rank=r, world_size=n, data_dir=data_dir, **kwargs)
                        for r in range(n)]
        self.turn = 0

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.loaders[self.turn])
        self.turn = (self.turn + 1) % len(self.loaders)
        return batch

    def state_dict(self):
        return self.loaders[0].state_dict()


class RecordingHook(AdaptiveSVDHook):
    """The real hook; also keeps every record this rank logs (all ranks log all layers)."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.records = []

    def _log(self, step, display, record):
        timing = ("layer_seconds", "analysis_seconds")  # wall times differ between ranks
        self.records.append(json.loads(json.dumps({k: (v.item() if torch.is_tensor(v) else v) for k, v in record.items()
                                                   if k not in timing})))
        super()._log(step, display, record)

    def _plan(self, step, layer):
        if os.environ.get("DIST_RUN_RAISE_RANK") == str(RANK):
            raise ValueError("injected planning error")
        return super()._plan(step, layer)


def digest(t):
    return hashlib.sha256(t.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def slowed(svd, seconds):
    def slow_svd(*args, **kwargs):
        time.sleep(seconds)
        return svd(*args, **kwargs)
    return slow_svd


def slow_save(save, seconds):
    def save_slowly(*args, **kwargs):
        print("DIST_RUN: saving", flush=True)
        time.sleep(seconds)
        return save(*args, **kwargs)
    return save_slowly


def main(argv):
    cfg = parse_args(AdaptiveConfig, argv, prog="tests/dist_run.py", description=__doc__)
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, f"pid{RANK}"), "w") as f:
        f.write(str(os.getpid()))
    if os.environ.get("DIST_RUN_EMULATE"):
        train_module.DataLoader = EmulatedRanksLoader
    if os.environ.get("DIST_RUN_FAIL_SVD_RANK") == str(RANK):
        asvd.svd = lambda *a, **k: asvd.SVDResult(reason="injected failure")
    if os.environ.get("DIST_RUN_SLOW_SVD"):
        asvd.svd = slowed(asvd.svd, float(os.environ["DIST_RUN_SLOW_SVD"]))
    if os.environ.get("DIST_RUN_SLOW_SAVE"):
        train_module.save_checkpoint = slow_save(train_module.save_checkpoint, float(os.environ["DIST_RUN_SLOW_SAVE"]))
    hook = RecordingHook(cfg) if cfg.adaptive_svd else TrainHook()
    state = {}

    def attach(run, _attach=hook.attach):
        state["run"] = run
        _attach(run)

    hook.attach = attach
    result = train_module.train(cfg, hook=hook, default_tag=f"d{cfg.depth}")
    run = state["run"]
    params = {name: digest(p) for name, p in run.model.named_parameters()}
    momentum = {run.muon.names[p]: digest(run.muon.state[p]["momentum_buffer"]) for p in run.muon.params()
                if "momentum_buffer" in run.muon.state[p]}
    for name, layer in getattr(hook, "layers", {}).items():
        if layer.module.U_k is not None:
            params[name + ".U_k"], params[name + ".V_k"] = digest(layer.module.U_k), digest(layer.module.V_k)
    out = {"rank": RANK, "losses": result["losses"], "val_bpb": result["val_bpb"], "params": params, "momentum": momentum,
           "records": getattr(hook, "records", [])}
    with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as f:
        json.dump(out, f)
    return exit_status(result["stopped_by_signal"], get_dist_info()[0])


if __name__ == "__main__":
    run_cli(main)
