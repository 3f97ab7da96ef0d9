"""Ahead-of-time compile of every shipped kernel config for sm_80 and sm_90 (no GPU needed).

A *job* is a dict ``dict(kernel=<@triton.jit fn>, name=str, dtype="bf16"|"fp16"|"fp32",
ints=dict, constexprs=dict, pointer_dtypes=dict(arg -> "*bf16"/"*fp32"...), num_warps=int,
num_stages=int)``, optionally with ``layout`` ("nchw" / "channels_last"). Kernel modules
export their jobs as ``report_jobs()`` (``fwd.py``, ``bwd.py``, ``weight.py``, ``layout.py``);
each is compiled here specialised as the JIT would specialise it on a GPU: pointers and ints
divisible by 16 carry ``tt.divisibility``, ints equal to 1 become constants (except
``do_not_specialize`` ones), ints beyond int32 are i64, any other argument is an fp32 scalar.
Without that, pipelining is off and the report lies.

Each row gives registers, spill bytes (stack + local memory), shared memory, the count of
tensor-core MMA instructions (HMMA / HGMMA), ``instructions`` (the whole kernel's SASS, which
counts an epilogue once per program) and ``loop_instructions``: the SASS instruction count of
the hot loop body. The hot loop is found from the backward branches in the SASS
(``BRA`` to a lower address): of the loops whose address range holds an MMA instruction, the
innermost one; when no loop holds an MMA (the direct kernel), the longest loop. Its body is every
instruction from the branch target to the branch, inclusive, i.e. what one warp issues per
iteration when nothing is predicated off.

    python -m scd_triton.kernels.report      # writes bench/results/kernel_report.json
"""
import argparse
import importlib
import json
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ARCHS = (80, 90)
_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)([^;]*);")


def _source(job):
    """An ASTSource of ``job`` specialised like the JIT's."""
    fn, ints, consts = job["kernel"], job["ints"], dict(job["constexprs"])
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in job["constexprs"]:
            signature[name] = "constexpr"
        elif name in job["pointer_dtypes"]:
            signature[name] = job["pointer_dtypes"][name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name not in ints:
            signature[name] = "fp32"
        elif ints[name] == 1 and name not in fn.do_not_specialize:
            signature[name] = "constexpr"
            consts[name] = 1
        else:
            signature[name] = "i32" if -2**31 <= ints[name] < 2**31 else "i64"
            if ints[name] % 16 == 0 and name not in fn.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, consts, attrs)


def loop_instructions(sass: str) -> int:
    """Instructions in the hot loop of a kernel's SASS (see the module docstring); 0 if none."""
    code = [(int(a, 16), op, rest) for a, op, rest in _SASS_LINE.findall(sass)]
    mma = [a for a, op, _ in code if op in ("HMMA", "HGMMA")]
    loops = []
    for addr, op, rest in code:
        target = re.search(r"0x([0-9a-f]+)", rest) if op == "BRA" else None
        if target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    with_mma = [lp for lp in loops if any(lp[0] <= a <= lp[1] for a in mma)]
    if with_mma:
        lo, hi = min(with_mma, key=lambda lp: lp[1] - lp[0])
    elif loops:
        lo, hi = max(loops, key=lambda lp: lp[1] - lp[0])
    else:
        return 0
    return sum(lo <= a <= hi for a, _, _ in code)


def _inspect(cubin: bytes):
    """(registers, spill bytes = stack + local memory, MMA count, MMA kinds, instructions, loop
    instructions) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([_CUOBJDUMP, "--dump-resource-usage", f.name], check=True,
                               capture_output=True, text=True).stdout
        sass = subprocess.run([_CUOBJDUMP, "--dump-sass", f.name], check=True,
                              capture_output=True, text=True).stdout
    field = lambda key: int(re.search(rf"{key}:(\d+)", usage).group(1))
    mma = re.findall(r"\b(HMMA|HGMMA)\b", sass)
    return (field("REG"), field("STACK") + field("LOCAL"), len(mma), sorted(set(mma)),
            len(_SASS_LINE.findall(sass)), loop_instructions(sass))


def compile_job(job, arch):
    """One report row: compiles ``job`` for sm_``arch``."""
    compiled = triton.compile(_source(job), target=GPUTarget("cuda", arch, 32),
                              options=dict(num_warps=job["num_warps"],
                                           num_stages=job["num_stages"]))
    registers, spills, mma, kinds, instructions, loop = _inspect(compiled.asm["cubin"])
    return dict(kernel=job["kernel"].__name__, config=job["name"],
                layout=job.get("layout", "-"), dtype=job["dtype"], arch=f"sm_{arch}",
                registers=registers, spill_bytes=spills, shared_bytes=compiled.metadata.shared,
                mma_instructions=mma, mma_kinds=kinds, instructions=instructions,
                loop_instructions=loop)


def all_jobs():
    """The jobs of every kernel module (each exports ``report_jobs()``)."""
    return [job for module in ("fwd", "bwd", "weight", "layout")
            for job in importlib.import_module(f".{module}", __package__).report_jobs()]


def all_rows(jobs=None, archs=ARCHS):
    """Every job (default: ``all_jobs()``) compiled for every arch."""
    return [compile_job(j, a) for j in (all_jobs() if jobs is None else jobs) for a in archs]


def format_table(rows):
    cols = ("kernel", "config", "layout", "dtype", "arch", "registers", "spill_bytes",
            "shared_bytes", "mma_instructions", "instructions", "loop_instructions")
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
