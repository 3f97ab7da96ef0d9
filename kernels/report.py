"""Ahead-of-time compile of every shipped forward config for sm_80 and sm_90 (no GPU needed).

For each (kernel, config, dtype, arch) it reports registers, spill bytes (stack / local memory),
shared memory and the count of tensor-core MMA instructions (HMMA / HGMMA) in the SASS. The
kernels are specialised as the JIT would on a GPU for a representative layer (ResNet-like
64→64 3×3 channels_last for the GEMM kernel, 128-channel depthwise 3×3 for the direct one):
pointers and ints divisible by 16 carry ``tt.divisibility``, ints equal to 1 are constants.

    python -m scd_triton.kernels.report      # writes bench/results/kernel_report.json
"""
import argparse
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .fwd import (DIRECT_CONFIGS, GEMM_CONFIGS, GEMM_CONFIGS_FP32, scd2d_fwd_direct_kernel,
                  scd2d_fwd_kernel)

ARCHS = (80, 90)
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _layer_args(N=32, C=64, O=64, H=56, W=56, R=3, S=3, groups=1):
    """Runtime int arguments of both kernels for a channels_last layer, stride 1, padding 1."""
    Cg, Og = C // groups, O // groups
    return dict(N=N, H=H, Wd=W, G=groups, Cg=Cg, Og=Og, O=O, OH=H, OW=W, M=N * H * W,
                M_BUCKET=(N * H * W).bit_length(), sxn=H * W * C, sxc=1, sxh=W * C, sxw=C,
                syn=H * W * O, syc=1, syh=W * O, syw=O, stride_h=1, stride_w=1, pad_h=1, pad_w=1,
                dil_h=1, dil_w=1), dict(R=R, S=S)


def _source(fn, dtype, ints, constexprs):
    """An ASTSource specialised like the JIT's: divisibility by 16, ints equal to 1 constant."""
    signature, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("X", "W", "Y", "Cout"):
            signature[name] = f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("P", "Q", "Norm"):
            signature[name] = "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("eps", "norm_eps"):
            signature[name] = "fp32"
        elif ints[name] == 1 and name not in fn.do_not_specialize:
            signature[name] = "constexpr"
            consts[name] = 1
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0 and name not in fn.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, consts, attrs)


def _inspect(cubin: bytes):
    """(registers, spill bytes = stack + local memory, MMA instruction count) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_CUOBJDUMP, "--dump-resource-usage", f.name], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([_CUOBJDUMP, "--dump-sass", f.name], check=True,
                              capture_output=True, text=True).stdout
    field = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))
    mma = len(re.findall(r"\b(?:HMMA|HGMMA)\b", sass))
    return field("REG"), field("STACK") + field("LOCAL"), mma


def compile_config(kernel, config, dtype, arch):
    """One report row: compiles ``kernel`` with ``config`` for ``dtype`` on sm_``arch``."""
    if kernel == "scd2d_fwd_kernel":
        fn, (BM, BN, BK, warps, stages) = scd2d_fwd_kernel, config
        ints, consts = _layer_args()
        consts.update(BM=BM, BN=BN, BK=BK, PRECISION="tf32")  # the GPU default for float32
        name = f"BM{BM}-BN{BN}-BK{BK}-w{warps}-s{stages}"
    else:
        fn, (BM, BO, warps, stages) = scd2d_fwd_direct_kernel, config
        ints, consts = _layer_args(C=128, O=128, groups=128)
        consts.update(BM=BM, BO=BO)
        name = f"BM{BM}-BO{BO}-w{warps}-s{stages}"
    compiled = triton.compile(_source(fn, DTYPES[dtype], ints, consts),
                              target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=warps, num_stages=stages))
    registers, spills, mma = _inspect(compiled.asm["cubin"])
    return dict(kernel=kernel, config=name, dtype=dtype, arch=f"sm_{arch}", registers=registers,
                spill_bytes=spills, shared_bytes=compiled.metadata.shared, mma_instructions=mma)


def all_rows():
    """Every shipped config: GEMM configs for their dtypes, direct configs for all dtypes."""
    jobs = [("scd2d_fwd_kernel", c, d) for c in GEMM_CONFIGS for d in ("bf16", "fp16")]
    jobs += [("scd2d_fwd_kernel", c, "fp32") for c in GEMM_CONFIGS_FP32]
    jobs += [("scd2d_fwd_direct_kernel", c, d) for c in DIRECT_CONFIGS for d in DTYPES]
    return [compile_config(k, c, d, a) for k, c, d in jobs for a in ARCHS]


def format_table(rows):
    cols = ("kernel", "config", "dtype", "arch", "registers", "spill_bytes", "shared_bytes",
            "mma_instructions")
    widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
    line = lambda vals: "| " + " | ".join(str(v).ljust(w) for v, w in zip(vals, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cols), sep] + [line([r[c] for c in cols]) for r in rows])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join("bench", "results", "kernel_report.json"))
    args = parser.parse_args()
    rows = all_rows()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)
    print(format_table(rows))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
