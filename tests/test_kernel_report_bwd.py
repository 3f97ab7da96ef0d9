"""The GPU-less performance gate of the backward: every bf16/fp16 dgrad and wgrad config the
launcher runs (``kernels.bwd.report_jobs``) compiles for sm_80 and sm_90 without register
spills and with tensor-core MMA instructions (HMMA on sm_80, HGMMA on sm_90).

Compiling needs real ``@triton.jit`` functions, so it runs in a subprocess without
``TRITON_INTERPRET``. The specialisation is the JIT's, as in ``kernels/report.py``: pointers
and ints divisible by 16 carry ``tt.divisibility``, ints equal to 1 are constants."""
import json
import os
import subprocess
import sys

import pytest

_SNIPPET = """
import json, re, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from scd_triton.kernels.bwd import report_jobs
from scd_triton.kernels.report import _CUOBJDUMP, _inspect

def source(job):
    fn, ints = job["kernel"], job["ints"]
    signature, consts, attrs = {}, dict(job["constexprs"]), {}
    for i, name in enumerate(fn.arg_names):
        if name in job["constexprs"]:
            signature[name] = "constexpr"
        elif name in job["pointer_dtypes"]:
            signature[name] = job["pointer_dtypes"][name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name not in ints:
            signature[name] = "fp32"
        elif ints[name] == 1 and name not in fn.do_not_specialize:
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0 and name not in fn.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, consts, attrs)

def mma_kinds(cubin):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([_CUOBJDUMP, "--dump-sass", f.name], check=True,
                              capture_output=True, text=True).stdout
    return sorted(set(re.findall(r"\\b(HMMA|HGMMA)\\b", sass)))

rows = []
for job in report_jobs():
    if job["dtype"] == "fp32" or job["kernel"].__name__ not in ("scd2d_dgrad_kernel",
                                                                 "scd2d_wgrad_kernel"):
        continue
    for arch in (80, 90):
        k = triton.compile(source(job), target=GPUTarget("cuda", arch, 32),
                           options=dict(num_warps=job["num_warps"], num_stages=job["num_stages"]))
        registers, spills, mma = _inspect(k.asm["cubin"])
        rows.append(dict(kernel=job["kernel"].__name__, config=job["name"], dtype=job["dtype"],
                         arch=f"sm_{arch}", registers=registers, spill_bytes=spills,
                         shared_bytes=k.metadata.shared, mma_instructions=mma,
                         mma_kinds=mma_kinds(k.asm["cubin"])))
json.dump(rows, sys.stdout)
"""


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run([sys.executable, "-c", _SNIPPET], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


@pytest.mark.parametrize("kernel", ["scd2d_dgrad_kernel", "scd2d_wgrad_kernel"])
def test_gemm_configs_have_no_spills_and_use_tensor_cores(rows, kernel):
    mine = [r for r in rows if r["kernel"] == kernel]
    assert {(r["dtype"], r["arch"]) for r in mine} == {
        (d, a) for d in ("bf16", "fp16") for a in ("sm_80", "sm_90")}
    assert len({r["config"] for r in mine}) == 2, "a small and a large config"
    for r in mine:
        assert r["spill_bytes"] == 0, r
        assert r["mma_instructions"] > 0, r
        assert r["mma_kinds"] == (["HMMA"] if r["arch"] == "sm_80" else ["HGMMA"]), r
        assert r["registers"] <= 255 and 0 < r["shared_bytes"] <= 227 * 1024, r
