"""A test double of CUDA's reduced-precision matmuls, so CPU tests can see what a GPU does to fp32 products.

Inside `CudaMatmuls()`, every matmul (`@`, matmul, mm, bmm, addmm, baddbmm, linear) rounds its two
multiplied operands as CUDA would under the settings in force at that call: to bf16 (8-bit significand)
while autocast is on for the operands' device, else to TF32 (11-bit significand: 10 stored mantissa
bits) while `torch.backends.cuda.matmul.allow_tf32` is set (nanochat.common.compute_init sets it for
CUDA runs), and leaves the product to accumulate in fp32 as tensor cores do. With neither setting the
matmul runs untouched (IEEE fp32), as cuBLAS then does. The double reads the settings per call, so code
that changes them for a scope (adaptive_svd.full_precision) is modelled as on the GPU.
"""

import torch
from torch.overrides import TorchFunctionMode

TWO_OPERANDS = {"matmul", "mm", "bmm", "__matmul__", "linear"}      # (a, b, ...)
WITH_INPUT = {"addmm", "addmm_", "baddbmm", "baddbmm_", "addbmm"}   # (input, a, b, ...): input is only added


def round_mantissa(x, bits):
    """fp32 x rounded to nearest (ties to even) with `bits` stored mantissa bits (TF32: 10, bf16: 7)."""
    drop = 23 - bits
    i = x.contiguous().view(torch.int32)
    # adding half an ulp of the kept part (minus one, plus the kept lowest bit) rounds to nearest, ties to even
    i = (i + ((1 << (drop - 1)) - 1) + ((i >> drop) & 1)) & ~((1 << drop) - 1)
    return i.view(torch.float32)


def reduce(t, bits):
    return round_mantissa(t, bits) if torch.is_tensor(t) and t.dtype == torch.float32 else t


class CudaMatmuls(TorchFunctionMode):
    """Counts the matmuls it rounded (`rounded`) and the ones left exact (`exact`)."""

    def __init__(self):
        super().__init__()
        self.rounded = self.exact = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        slots = (0, 1) if name in TWO_OPERANDS else (1, 2) if name in WITH_INPUT else ()
        if slots and torch.is_tensor(args[slots[0]]):
            device_type = args[slots[0]].device.type
            bits = 7 if torch.is_autocast_enabled(device_type) else 10 if torch.backends.cuda.matmul.allow_tf32 else None
            if bits is None:
                self.exact += 1
            else:
                self.rounded += 1
                args = tuple(reduce(a, bits) if i in slots else a for i, a in enumerate(args))
        return func(*args, **kwargs)
