"""nanochat.host_sync counts every kind of call that makes the host wait for the device, once per call,
and nothing else."""

import torch

from nanochat.host_sync import HostSyncs


def test_counts_each_waiting_call_once_and_nothing_else():
    x = torch.randn(6, 4)
    with HostSyncs() as syncs:
        y = (x @ x.T).relu().sum(0)       # device work: no wait
        x.to(torch.float64)               # a dtype change stays on the device
        x[0, 1:3].norm()
        float(y[0]); int(y[1]); bool(y[2] > 0); y.max().item(); y.tolist()
        if y[3] > 0:                      # a branch on a device value reads it back
            pass
        x.cpu(); x.to("cpu"); x.to(device=x.device)  # the last one names the tensor's own device: no copy
        torch.nonzero(y > 0); y[y > 0]
        torch.linalg.svd(x, full_matrices=False); torch.linalg.svdvals(x); torch.linalg.qr(x)
    assert syncs.by_kind == {"__float__": 1, "__int__": 1, "__bool__": 2, "item": 1, "tolist": 1, "cpu": 1,
                             "to(device)": 1, "nonzero": 1, "boolean index": 1, "linalg_svd": 1, "linalg_svdvals": 1}
    assert syncs.count == 12 and syncs.seconds >= 0.0


def test_nothing_is_counted_outside_the_block():
    with HostSyncs() as syncs:
        pass
    float(torch.ones(()))
    assert syncs.count == 0
