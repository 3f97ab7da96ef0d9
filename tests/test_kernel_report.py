"""The GPU-less performance gate: the main forward configs compile for sm_80 and sm_90 without
register spills and with tensor-core MMA instructions (HMMA / HGMMA).

Compiling needs real ``@triton.jit`` functions, so it runs in a subprocess without
``TRITON_INTERPRET`` (the test session itself may run the interpreter)."""
import json
import os
import subprocess
import sys

import pytest

_SNIPPET = """
import json, sys
from scd_triton.kernels.fwd import DIRECT_CONFIGS, GEMM_CONFIGS
from scd_triton.kernels.report import compile_config
rows = [compile_config("scd2d_fwd_kernel", GEMM_CONFIGS[0], d, a) for d in ("bf16", "fp16")
        for a in (80, 90)]
rows.append(compile_config("scd2d_fwd_direct_kernel", DIRECT_CONFIGS[0], "bf16", 80))
json.dump(rows, sys.stdout)
"""


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", _SNIPPET], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def test_main_gemm_config_has_no_spills_and_uses_tensor_cores(rows):
    gemm = [r for r in rows if r["kernel"] == "scd2d_fwd_kernel"]
    assert {(r["dtype"], r["arch"]) for r in gemm} == {
        (d, a) for d in ("bf16", "fp16") for a in ("sm_80", "sm_90")}
    for r in gemm:
        assert r["spill_bytes"] == 0, r
        assert r["mma_instructions"] > 0, r
        assert r["registers"] <= 255 and 0 < r["shared_bytes"] <= 227 * 1024, r


def test_depthwise_direct_kernel_has_no_spills(rows):
    direct = [r for r in rows if r["kernel"] == "scd2d_fwd_direct_kernel"]
    assert direct and all(r["spill_bytes"] == 0 and r["mma_instructions"] == 0 for r in direct)
