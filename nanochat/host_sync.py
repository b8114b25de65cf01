"""Counting host synchronisations: the calls that make the host wait for the device.

A GPU runs what the host queues; the host waits only where it needs a result: a value read back
(`.item()`, `float()` / `int()` / `bool()` of a tensor, `.tolist()`, `.numpy()`), a copy between devices
(`.cpu()`, `.to(device)`), an output whose size depends on the data (`nonzero`, boolean-mask indexing),
and linear algebra that checks its convergence flags on the host (`svd`, `svdvals`, `eigh`, ...). Each
such wait idles the GPU for a launch latency plus whatever was queued, so an analysis that does one per
matrix costs far more than its FLOPs. `HostSyncs` counts these calls by kind inside a `with` block and
times how long the host waited in the read-backs and copies (the linear algebra's time is its own work).
On CPU nothing really waits, so the count is of the calls that would synchronise on a GPU, which is
what a test of "no per-matrix sync" needs.
"""

import contextlib
import time
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode

READ_BACK = {"item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy", "cpu", "cuda"}
DATA_DEPENDENT = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive"}
# linalg kernels whose info flags torch checks on the host (their *_ex variants do not)
CHECKED_LINALG = {"linalg_svd", "linalg_svdvals", "svd", "linalg_eigh", "linalg_eigvalsh", "linalg_eig", "linalg_cholesky",
                  "linalg_inv", "linalg_solve", "cholesky", "inverse"}


def _kind(func, args, kwargs):
    """The sync kind of a call, or None when it does not make the host wait."""
    name = getattr(func, "__name__", "")
    if name in READ_BACK or name in DATA_DEPENDENT or name in CHECKED_LINALG:
        return name
    if name == "to":
        target = kwargs.get("device", next((a for a in args[1:] if isinstance(a, (str, torch.device))), None))
        # a copy to another device, or to "cpu" by name (a CPU run cannot tell "cpu" from W.device, a GPU run's
        # copy to the host is written that way); a dtype change or a move to the tensor's own device is no copy
        if target == "cpu" or (target is not None and torch.device(target) != args[0].device):
            return "to(device)"
    if name == "__getitem__" and len(args) > 1:
        index = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(torch.is_tensor(i) and i.dtype == torch.bool for i in index):
            return "boolean index"
    return None


_host_side = [0]  # depth of host_side() blocks


@contextlib.contextmanager
def host_side():
    """Inside, nothing counts: the block works on numbers the host already holds (tensors it built from
    values read back earlier), which never wait for the device."""
    _host_side[0] += 1
    try:
        yield
    finally:
        _host_side[0] -= 1


class HostSyncs(TorchFunctionMode):
    """with HostSyncs() as syncs: ...  then syncs.count (total), syncs.by_kind (Counter) and syncs.seconds (time
    in the read-backs, copies and data-dependent shapes, which on a GPU includes waiting for the queued work)."""

    def __init__(self):
        super().__init__()
        self.by_kind = Counter()
        self.seconds = 0.0

    @property
    def count(self):
        return sum(self.by_kind.values())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = None if _host_side[0] else _kind(func, args, kwargs)
        if kind is None:
            return func(*args, **kwargs)
        self.by_kind[kind] += 1
        if kind in CHECKED_LINALG:
            return func(*args, **kwargs)
        t0 = time.perf_counter()
        try:
            return func(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0
