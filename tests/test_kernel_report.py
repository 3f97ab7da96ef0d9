"""The GPU-less performance gate (``kernels/report.py``): the main configs of the forward
and of the backward's dgrad and wgrad GEMMs (bf16 / fp16), for both input layouts,
compile for sm_80 and sm_90 without register spills, with tensor-core MMA instructions (HMMA
on sm_80, wgmma ``HGMMA`` on sm_90); the forward's hot loop and whole kernel and the backward
GEMMs' loops stay short, the NCHW ones as short as channels_last's; the direct, prologue, weight,
layout and NCHW preparation kernels (the forward's, and the backward's prologue with the copy
of x) compile without spills. A 40-channel layer's forward, GEMMs and prologue (rows that are
not multiples of 16, aligned by the kernels' vector units) are gated the same way.

Compiling needs real ``@triton.jit`` functions, so it runs in a subprocess without
``TRITON_INTERPRET`` (the test session itself may run the interpreter); two worker processes
share the compiles (the full report of every shipped config is ``make kernel-report``)."""
import json
import os
import subprocess
import sys

import pytest

LOOP_BOUND = {"sm_80": 400, "sm_90": 300}
# the backward GEMMs' main configs, which are issue-bound: a large config's K step is 256
# cycles of MMA on an H100 (the small ones' 128) against 290 (dgrad) and 382 (wgrad) SASS
# instructions of 4 warps before this gate; the wgrad's position cursor took its loops from
# 262-309 (sm_80) and 226-251 (sm_90) to 185-253 and 160-191 (Triton 3.6 and 3.9); the
# dgrad's box sum out of its loop took its loops from 211-289 and 183-207 to 180-270 and 155-193
BACKWARD_LOOP_BOUND = {"scd2d_dgrad_kernel": {"sm_80": 280, "sm_90": 200},
                       "scd2d_wgrad_kernel": {"sm_80": 270, "sm_90": 200}}

_SNIPPET = """
import json, sys
from concurrent.futures import ProcessPoolExecutor
from scd_triton.kernels import bwd, fwd, layout, weight
from scd_triton.kernels.launch import divisor_magic
from scd_triton.kernels.report import compile_job

def picked():
    jobs = []
    for j in fwd.report_jobs():
        if j["name"].startswith("3x3 128-128") and j["dtype"] in ("bf16", "fp16"):
            jobs += [(j, a) for a in (80, 90)]
        if j["name"].startswith("3x3 40-40") and j["layout"] == "channels_last":
            jobs += [(j, a) for a in (80, 90)]
        if "(split K)" in j["name"] and j["dtype"] == "bf16":
            jobs += [(j, a) for a in (80, 90)]
        if j["name"].startswith("dw") and j["dtype"] == "bf16" and j["layout"] == "nchw":
            jobs.append((j, 90))
        if j["kernel"].__name__ == "scd2d_fwd_prepare_kernel" and j["dtype"] == "bf16":
            jobs.append((j, 90))
    for j in bwd.report_jobs():
        if j["kernel"].__name__ in ("scd2d_dgrad_kernel", "scd2d_wgrad_kernel") and \\
                j["dtype"] in ("bf16", "fp16"):
            jobs += [(j, a) for a in (80, 90)]
        if j["kernel"].__name__ in ("scd2d_bwd_prologue_kernel",
                                    "scd2d_bwd_prologue_copy_kernel") and j["dtype"] == "bf16":
            jobs.append((j, 80))
        if j["kernel"].__name__ == "scd2d_dgrad_direct_kernel" and j["dtype"] == "bf16" and \
                j["layout"] == "channels_last" and not j["name"].startswith("dw40"):
            jobs.append((j, 90))
    jobs += [(j, 90) for j in weight.report_jobs() + layout.report_jobs()
             if j["dtype"] == "bf16" or j["kernel"].__name__ == "sum_splits_kernel"]
    return jobs + edge_jobs()

def edge_jobs():
    # the wgrads with ints the JIT turns into constants (equal to 1: a fast_divmod shift for a
    # 2-pixel output side, one output channel) or types as 64-bit (a magic multiplier of
    # 2**31 or more, for 10 pixels; the direct wgrad's), and the GEMM wgrad's int64 cursor
    jobs = []
    for j in bwd.report_jobs():
        if "wgrad" not in j["kernel"].__name__ or j["dtype"] != "bf16" or \
                j["layout"] != "channels_last" or j["name"].startswith(("small", "40-40", "dw40")):
            continue
        for side, channels in ((2, j["ints"]["O"]), (10, j["ints"]["O"]), (7, 1)):
            if channels == 1 and "direct" in j["kernel"].__name__:
                continue   # direct layers have groups, so at least two output channels
            ints = dict(j["ints"], OH=side, OW=side, H=side, Wd=side,
                        **dict(zip(("oh_mul", "oh_shift", "ow_mul", "ow_shift"),
                                   (*divisor_magic(side), *divisor_magic(side)))))
            if channels == 1:
                ints.update(O=1, Og=1)
            jobs.append((dict(j, name=f"{j['name']} edge {side}^2 O{channels}", ints=ints), 90))
        if "direct" not in j["kernel"].__name__:   # int64 cursor offsets (inputs ≥ 2**31)
            jobs.append((dict(j, name=f"{j['name']} edge int64",
                              constexprs=dict(j["constexprs"], WIDE=True)), 90))
    return jobs

def run(i):
    j, a = picked()[i]
    return compile_job(j, a)

if __name__ == "__main__":
    with ProcessPoolExecutor(2) as pool:
        json.dump(list(pool.map(run, range(len(picked())))), sys.stdout)
"""


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = tmp_path_factory.mktemp("report") / "snippet.py"
    script.write_text(_SNIPPET)
    out = subprocess.run([sys.executable, str(script)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)


def _tensor_cores(r):
    assert r["spill_bytes"] == 0, r
    assert r["mma_kinds"] == (["HMMA"] if r["arch"] == "sm_80" else ["HGMMA"]), r
    assert r["registers"] <= 255 and 0 < r["shared_bytes"] <= 227 * 1024, r


def test_main_forward_configs_have_no_spills_and_use_tensor_cores(rows):
    gemm = [r for r in rows if r["kernel"] == "scd2d_fwd_kernel" and "split K" not in r["config"]]
    assert {(r["layout"], r["dtype"], r["arch"]) for r in gemm} == {
        (lay, d, a) for lay in ("channels_last", "nchw") for d in ("bf16", "fp16")
        for a in ("sm_80", "sm_90")}
    for r in gemm:
        _tensor_cores(r)
        # per K step before the loop was slimmed (bf16): 437 on sm_80, 368 on sm_90
        assert 0 < r["loop_instructions"] <= LOOP_BOUND[r["arch"]], r
        # the whole kernel, epilogue included: 2744-2984 with div.full and lg2/ex2 without
        # .ftz (their denormal range checks and scaling, ~9 instructions per output element),
        # 1920-2152 with a reciprocal per element for a shared q too (now one a row)
        per_channel_q = r["config"].endswith("per-channel q")
        assert 0 < r["instructions"] <= (2200 if per_channel_q else 1900), r


def test_a_split_k_keeps_the_forward_loop_and_sums_its_parts_without_mma(rows):
    """3×3 512→512 7² b32 splits K: the partial launch's loop is the unsplit tile's (tensor
    cores, within the forward's bound, no spills); the second launch sums the parts with no
    MMA and runs the epilogue, no spills either."""
    split = [r for r in rows if "(split K)" in r["config"]]
    partial = [r for r in split if r["config"].endswith("partial")]
    summing = [r for r in split if r["config"].endswith("epilogue")]
    both = {(lay, a) for lay in ("channels_last", "nchw") for a in ("sm_80", "sm_90")}
    assert {(r["layout"], r["arch"]) for r in partial} == both
    assert {(r["layout"], r["arch"]) for r in summing} == both
    for r in partial:
        _tensor_cores(r)
        assert 0 < r["loop_instructions"] <= LOOP_BOUND[r["arch"]], r
    for r in summing:
        assert r["spill_bytes"] == 0 and r["mma_instructions"] == 0 and r["registers"] <= 255, r


@pytest.mark.parametrize("kernel", ["scd2d_dgrad_kernel", "scd2d_wgrad_kernel"])
def test_backward_gemm_configs_have_no_spills_and_use_tensor_cores(rows, kernel):
    every = [r for r in rows if r["kernel"] == kernel and " edge " not in r["config"]
             and "split K" not in r["config"]]
    mine = [r for r in every if not r["config"].startswith("flat")]
    for r in every:   # the flat (channel, tap) wgrad of narrow layers included
        _tensor_cores(r)
    assert {(r["layout"], r["dtype"], r["arch"]) for r in mine} == {
        (lay, d, a) for lay in ("channels_last", "nchw") for d in ("bf16", "fp16")
        for a in ("sm_80", "sm_90")}
    configs = {r["config"].split("-")[0] for r in mine}
    assert configs - {"1x1 s2 64"} == {"small", "large", "40"}, \
        "a small and a large config, and 40 channels"
    for r in mine:
        assert r["loop_instructions"] <= BACKWARD_LOOP_BOUND[kernel][r["arch"]], r
    assert len(every) - len(mine) == (4 if kernel == "scd2d_wgrad_kernel" else 0)
    # NCHW grad_x stored along positions: the K loop no longer than channels_last's (before
    # per-image tiles, the NCHW dgrad spilled 744-1232 B; NCHW x tiles in the wgrad loop
    # took 2038 instructions per K step on sm_80 against 441 on a channels_last copy); 10% for
    # the register allocator's moves (the same memory instructions; 16 more predicate moves,
    # PRMT / PLOP3, in the small sm_80 dgrad with Triton 3.9)
    key = lambda r: (r["config"], r["dtype"], r["arch"])
    cl = {key(r): r["loop_instructions"] for r in mine if r["layout"] == "channels_last"}
    for r in mine:
        if r["layout"] == "nchw":
            assert 0 < r["loop_instructions"] <= cl[key(r)] * 1.10, r


def test_a_split_dgrad_keeps_its_loop_and_sums_its_parts_without_mma(rows):
    """3×3 512→512 7² b32 splits the dgrad's K too: the partial launch's loop is within the
    unsplit dgrad's bound, on tensor cores, without spills; the second launch sums the parts
    and the taps' box sums with no MMA and no spills (NCHW: its workspace tiles run along
    positions, as grad_x: 120 B of spills with rows along channels, sm_90)."""
    split = [r for r in rows if r["kernel"] == "scd2d_dgrad_kernel" and "split K" in r["config"]]
    partial = [r for r in split if r["config"].endswith("partial")]
    summing = [r for r in split if r["config"].endswith("epilogue")]
    both = {(lay, a) for lay in ("channels_last", "nchw") for a in ("sm_80", "sm_90")}
    assert {(r["layout"], r["arch"]) for r in partial if r["dtype"] == "bf16"} == both
    assert {(r["layout"], r["arch"]) for r in summing if r["dtype"] == "bf16"} == both
    for r in partial:
        _tensor_cores(r)
        assert 0 < r["loop_instructions"] <= BACKWARD_LOOP_BOUND["scd2d_dgrad_kernel"][r["arch"]], r
    for r in summing:
        assert r["spill_bytes"] == 0 and r["mma_instructions"] == 0 and r["registers"] <= 255, r


def test_strided_dgrad_loops_do_not_divide(rows):
    """At stride 2 the stride and the phase's taps are runtime ints: the GEMM dgrad's loop,
    which divided by them each step (266 SASS instructions against 182 at stride 1, sm_90
    bf16), carries its tap and channel block (196, a 1×1 stride-2 layer whose skipped pixels
    also take the ``UNREAD`` select); the direct dgrad, which divided each tap's [BM] rows
    (218 instructions a tap over stride 1's), divides the tap's scalar offset (93 over)."""
    loop = {(r["kernel"], r["config"].split("-")[0], r["arch"]): r["loop_instructions"]
            for r in rows if r["dtype"] == "bf16" and r["layout"] == "channels_last"}
    for arch in ("sm_80", "sm_90"):
        strided = loop[("scd2d_dgrad_kernel", "1x1 s2 64", arch)]
        assert strided <= 1.1 * loop[("scd2d_dgrad_kernel", "small", arch)], (arch, strided)
    direct = loop[("scd2d_dgrad_direct_kernel", "s2 BM64", "sm_90")]
    assert direct <= loop[("scd2d_dgrad_direct_kernel", "BM64", "sm_90")] + 120, direct


def test_the_direct_dgrad_reads_depthwise_norms_along_channels(rows):
    """With channels_last x a depthwise layer's norms (here grad_‖s‖/‖s‖, in their memory)
    are stored groups-innermost, so the direct dgrad loads a tap's [positions, channels] of
    them 16 bytes at a time, as grad_d: positions-innermost, they were 32 scalar loads a
    thread and tap, and the loop 399 SASS instructions (bf16, sm_90; 289 since, ŵ tap-major
    too)."""
    direct = [r for r in rows if r["kernel"] == "scd2d_dgrad_direct_kernel"]
    assert {r["config"].split("-")[0] for r in direct} == {"BM64", "s2 BM64"}
    for r in direct:
        assert r["spill_bytes"] == 0 and 0 < r["loop_instructions"] <= 330 + 100 * (
            r["config"].startswith("s2")), r


def test_wgrads_compile_with_ints_the_jit_makes_constant_or_64_bit(rows):
    """A 2-pixel output side (fast_divmod's shift is then 1, which the JIT passes as a
    constant), one output channel, and a 10-pixel side (its magic multiplier passes as i64)
    compile, without spills; ``.to`` on such a constant failed to compile. So does the GEMM
    wgrad's int64 cursor (``WIDE``)."""
    edges = [r for r in rows if " edge " in r["config"]]
    assert {r["config"].split(" edge ")[1] for r in edges} >= {"2^2 O128", "10^2 O128", "7^2 O1",
                                                                "int64"}
    assert {r["kernel"] for r in edges} == {"scd2d_wgrad_kernel", "scd2d_wgrad_direct_kernel"}
    assert all(r["spill_bytes"] == 0 and r["loop_instructions"] > 0 for r in edges), edges


def test_direct_prologue_and_weight_kernels_have_no_spills(rows):
    others = [r for r in rows if r["kernel"] in (
        "scd2d_fwd_direct_kernel", "scd2d_bwd_prologue_kernel", "normalize_weight_kernel",
        "normalize_weight_backward_kernel", "sum_splits_kernel", "nchw_to_channels_last_kernel",
        "scd2d_fwd_prepare_kernel", "scd2d_bwd_prologue_copy_kernel")]
    assert len({r["kernel"] for r in others}) == 8
    for kernel in ("scd2d_bwd_prologue_kernel", "normalize_weight_kernel",
                   "normalize_weight_backward_kernel"):   # the weight kernels: w's layout
        assert {r["layout"] for r in others if r["kernel"] == kernel} == {"channels_last", "nchw"}
    assert all(r["spill_bytes"] == 0 and r["mma_instructions"] == 0 for r in others), others
