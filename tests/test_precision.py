"""Matmul precision: the fp32 path is exactly today's."""

import math

import pytest

from tests.fp32_fingerprint import fingerprint

# Printed by `python -m tests.fp32_fingerprint` at commit e8650a1 (before --dtype existed), torch
# 2.13.0+cpu, on this project's 2-core AVX512 build machine; identical on 1 and 2 threads and across runs.
FP32_GOLDEN = {
    "losses": ["0x1.0a2b220000000p+3", "0x1.0791520000000p+3", "0x1.062f040000000p+3",
               "0x1.ffabe40000000p+2", "0x1.00986e0000000p+3", "0x1.f4e6800000000p+2"],
    "weights_sha256": "4d761558516af49ea75b32113161b9a745cd2053c19715deb925a882cafcb9b9",
    "torch": "2.13.0+cpu",
    "cpu_capability": "AVX512",
}


@pytest.fixture
def base(prepared_base, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(prepared_base))
    return prepared_base


def test_fp32_run_is_bit_identical_to_before_the_dtype_flag(base, tmp_path):
    got = fingerprint(tmp_path)
    if (got["torch"], got["cpu_capability"]) == (FP32_GOLDEN["torch"], FP32_GOLDEN["cpu_capability"]):
        assert got["losses"] == FP32_GOLDEN["losses"]
        assert got["weights_sha256"] == FP32_GOLDEN["weights_sha256"]
    else:  # another kernel library: the same computation, rounded differently
        for a, b in zip(got["losses"], FP32_GOLDEN["losses"], strict=True):
            assert math.isclose(float.fromhex(a), float.fromhex(b), rel_tol=1e-4)
