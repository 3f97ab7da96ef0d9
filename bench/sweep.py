"""A/B timings of the launchers' block choices, in one command of a few minutes on a lent GPU.

    python -m bench.sweep [--shapes NAME ...] [--variants NAME ...] [--out-dir bench/results]

Each variant puts one block choice of the launchers back to its earlier form, or tries a
candidate, for whole steps: per shape (channels_last input; bfloat16 on CUDA, float32 in the
CPU interpreter) it times the forward and the training step of the triton backend under CUDA
graphs (``do_bench_cudagraph``, median; a host clock on CPU) and compares the output and the
gradients of x and w with the shipped choices' (``‖a − b‖ / ‖b‖``). The first four variants
undo GPU blocks chosen since the last lease or in it (docs/GPU_NOTES.md sections 13 and 14:
the prologue's, the split sum's and the forward prepare's Σ_c x² tiles were chosen from the
SASS alone, untimed), the next two the kernels' vector units and the forward's K blocks for
channel counts that are not multiples of 16 (section 17: 3×3 40→40 and 1×1 80→40); the others
try candidates: for the deep layers on small images, whose GEMMs fill under one wave of SMs,
a dgrad K block of 64 for O/G ≤ 64 (one K step a tap instead of two), 128×128
weight-gradient tiles (a third less L2 traffic a MAC) and, for short K, forward tiles of 64
rows, two a SM (section 22); the next two put back
the depthwise layers' norms positions-innermost and the weight gradient's workspace tap-minor
(section 20), the next two the forward's K unsplit and channels_last weights read through
their strides (section 21), and the last two the dgrad's K unsplit and a candidate, its K
split without the memory cap (section 22). Writes
``<out-dir>/<gpu>-sweep.json`` after every row (``complete`` once all ran), so that a run cut
short by a lease's time limit keeps what it timed. Needs torch with CUDA and the project
installed. Most of a variant's first call is compiling its kernels, one after another on one
core: on the whole suite that is a few hundred kernels, ~2–3 s each, past a lease command's 10
minutes. So first ``--jobs`` processes (default: one per core, up to 16) make every (shape,
variant) call once, side by side, which compiles them into Triton's on-disk cache; the timing
pass then finds them there (``--no-warm`` skips it; ``--shapes`` / ``--variants`` narrow the
run).
"""
import argparse
import contextlib
import datetime
import json
import os
import sys
import time

import torch

import scd_triton
from bench import gpu_check, run as bench
from bench.shapes import suite
from scd_triton.kernels import bwd, fwd, launch, weight


# the launchers work out their launches once per layer signature
_PLAN_CACHES = (bwd._plan, fwd._plan, fwd.prepare_launch, fwd.gemm_config, fwd.sumsq_tiles,
                weight.normalize_args, weight._backward_args)


def _clear_plans():
    for cached in _PLAN_CACHES:
        cached.cache_clear()


def _patched(modules, name, make):
    """A variant: ``module.name`` of each of ``modules`` (one or a tuple) replaced by
    ``make(original)`` while it is entered, with the launch plans worked out anew on entry and
    exit."""
    modules = modules if isinstance(modules, tuple) else (modules,)

    @contextlib.contextmanager
    def variant():
        originals = [getattr(module, name) for module in modules]
        for module, original in zip(modules, originals):
            setattr(module, name, make(original))
        _clear_plans()
        try:
            yield
        finally:
            for module, original in zip(modules, originals):
                setattr(module, name, original)
            _clear_plans()
    return variant


def _unspread_weight_blocks(programs, Og, BO, K, along_channels):
    """``weight._gpu_blocks`` before it: the interpreter's 8 channels a program, same chunks."""
    return (programs, *weight._blocks(Og, K))


def _wide_dgrad_k(config, Og, sixteen_bit):
    """A dgrad config with BK 64 where the 16-bit "small" one takes 32 and O/G ≤ 64 (sm_90
    SASS: 289 instructions a tap at 64 channels against 2 × 182; no spills, 72 KB of shared
    memory)."""
    BM, BN, BK, warps, stages = config
    return (BM, BN, 64, warps, stages) if sixteen_bit and BK == 32 and Og <= 64 else config


def _square_wgrad(config):
    """The 16-bit "large" wgrad config with 128×128 tiles of 8 warps instead of 128×64 of 4
    (sm_90 SASS: 118 registers, no spills, 96 KB of shared memory; 177 instructions a K step
    for twice the MMAs of the 128×64 tile's 191): a third less L2 traffic a MAC, for the deep
    layers whose weight gradient re-reads grad_d and x once per tap and channel tile."""
    return (128, 128, *config[2:3], 8, config[4]) if config == bwd.WGRAD_CONFIGS["large"] \
        else config


def _short_k_forward(config, Cg, R, S):
    """A 16-bit forward config with 64×128 tiles of 4 warps where 128×128 ones of 8 run at most
    8 K steps (conv1d k3 128→128: 6): two tiles a SM, so one's epilogue can overlap the
    other's MMAs, where one 8-warp tile a SM leaves the tensor cores idle through it (sm_90
    SASS, a warp: the whole kernel 1784 instructions, the split-K partial launch, which has no
    epilogue, 928; a K step 139)."""
    BM, BN, BK, flat_k, warps, stages = config
    short = not flat_k and fwd.k_steps(Cg, R, S, BK, flat_k) <= 8
    if (BM, BN, warps) == (128, 128, 8) and short:
        return 64, BN, BK, flat_k, 4, stages
    return config


def _narrow_forward(config):
    """A forward GEMM config with output-channel tiles of at most 64 (more programs)."""
    BM, BN, BK, flat_k, warps, stages = config
    BN = min(BN, 64)
    return BM, BN, BK, flat_k, 8 if BM * BN >= 128 * 128 else 4, stages


VARIANTS = {
    "shipped": contextlib.nullcontext,
    "prologue tiles not spread": _patched(
        bwd, "_prologue_blocks", lambda f: lambda *a: f(*a[:-1], 0)),
    "split sum 16 splits x 256": _patched(
        weight, "_sum_splits_blocks", lambda f: lambda n, splits, spread: f(n, splits, False)),
    "weight kernels 8 channels a program": _patched(
        weight, "_gpu_blocks", lambda f: _unspread_weight_blocks),
    "prepare sums of squares not spread": _patched(
        fwd, "sumsq_tiles", lambda f: lambda Cg, P, images=0, channels_contiguous=True: f(Cg, P)),
    "no vector units": _patched((fwd, bwd, launch), "vector_unit", lambda f: lambda *a: 1),
    "forward BK by padding alone": _patched(
        fwd, "_block_k", lambda f: lambda n, choices, issue_bound=False: f(n, choices)),
    "wgrad splits halved": _patched(bwd, "_splits", lambda f: lambda *a: max(1, f(*a) // 2)),
    "wgrad splits doubled": _patched(bwd, "_splits", lambda f: lambda *a: 2 * f(*a)),
    "forward BN at most 64": _patched(fwd, "gemm_config", lambda f: lambda *a: _narrow_forward(f(*a))),
    "forward 64-row tiles on short K": _patched(
        fwd, "gemm_config", lambda f: lambda Cg, Og, R, S, G, M, fp32: _short_k_forward(
            f(Cg, Og, R, S, G, M, fp32), Cg, R, S)),
    "dgrad BK 64 on narrow layers": _patched(   # one K step a tap for O/G ≤ 64, not two
        bwd, "_dgrad_config", lambda f: lambda dtype, Cg, Og, cuda: _wide_dgrad_k(
            f(dtype, Cg, Og, cuda), Og, cuda and dtype != torch.float32)),
    "dgrad small tiles": _patched(
        bwd, "_dgrad_config", lambda f: lambda dtype, Cg, Og, cuda: f(dtype, min(Cg, 64), Og, cuda)),
    "wgrad 128x128 tiles": _patched(
        bwd, "_wgrad_config", lambda f: lambda dtype, Cg, Og, cuda, flat_cols=0, large=True:
        _square_wgrad(f(dtype, Cg, Og, cuda, flat_cols, large))),
    "wgrad small tiles": _patched(
        bwd, "_wgrad_config", lambda f: lambda dtype, Cg, Og, cuda, flat_cols=0, large=True:
        f(dtype, Cg, Og, cuda, flat_cols, False)),
    # depthwise layers on channels_last x: the norms positions-innermost, as before section 20
    "norms positions innermost": _patched(
        (fwd, bwd), "saved_norm_format", lambda f: lambda *a: torch.contiguous_format),
    # the GEMM wgrad's workspace [splits, O, C/G, R, S] (scalar epilogue stores), as before
    "wgrad workspace tap-minor": _patched(bwd, "WGRAD_WS_TAP_MAJOR", lambda tap_major: False),
    # the forward of layers that fill under half the GPU in one launch, K unsplit, as before
    "forward K not split": _patched(fwd, "split_k", lambda f: lambda *a: 1),
    # channels_last weights read through their strides, a channel apart, as before
    "weights through their strides": _patched(
        weight, "w_order", lambda f: lambda *a: 0 if f(*a) == 2 else f(*a)),
    # the dgrad of layers that fill under half the GPU in one launch, K unsplit, as before;
    # and a candidate: split also where the workspace outgrows the backward's other transients
    # (3×3 40→40 8² b64: 2.1 MB against a 0.3 MB output)
    "dgrad K not split": _patched(bwd, "split_k", lambda f: lambda *a: 1),
    "dgrad K split beyond its memory room": _patched(
        bwd, "_dgrad_splits", lambda f: lambda *a: f(*a[:5], 2**62)),
}


def _time_us(step, device):
    if device.type == "cuda":
        import triton.testing
        step()
        return triton.testing.do_bench_cudagraph(step, return_mode="median") * 1e3
    start = time.perf_counter()
    step()
    return (time.perf_counter() - start) * 1e6


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _layer(shape, device):
    """``(fn, (x, w, p, q), grad_y)`` of ``shape``: the triton backend's call on channels_last
    inputs, bfloat16 on CUDA, float32 on CPU (the interpreter)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    stride, padding = bench._conv_args(shape)
    fn = lambda x, w, p, q: scd_triton.scd2d(x, w, p, q, stride, padding, 1, shape.groups,
                                             backend="triton")
    torch.manual_seed(0)
    inputs = bench.make_inputs(shape, dtype, device, "channels_last")
    return fn, inputs, torch.randn_like(fn(*inputs))


def _variant_calls(fn, inputs, grad):
    """``(results, forward, step)`` under the variant entered: y and the gradients of x and w
    of one training step, and the two calls the sweep times (the no-grad forward and the
    training step; their first calls compile what the variant changes)."""
    x, w, p, q = inputs
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = fn(xg, wg, p, q)
    results = (y.detach(), *torch.autograd.grad(y, (xg, wg), grad))
    forward = torch.no_grad()(lambda: fn(x, w, p, q))
    step = lambda: torch.autograd.grad(fn(xg, wg, p, q), (xg, wg), grad)
    return results, forward, step


def _names(variants):
    """The variants a run takes, "shipped" first."""
    return ["shipped", *[v for v in variants if v != "shipped"]]


def warm_shard(shapes, variants, index, count, device):
    """Makes every call the sweep times once for the (shape, variant) pairs ``index``,
    ``index + count``, … (shape by shape, variants in run order), which compiles their kernels
    into Triton's on-disk cache; returns those pairs' labels."""
    pairs = [(shape, name) for shape in shapes for name in _names(variants)][index::count]
    layers = {}
    for shape, name in pairs:
        if shape.label not in layers:
            layers[shape.label] = _layer(shape, device)
        fn, inputs, grad = layers[shape.label]
        with VARIANTS[name]():
            _, forward, _ = _variant_calls(fn, inputs, grad)
            forward()
    return [(shape.label, name) for shape, name in pairs]


def run(shapes, variants, device, log=print, on_row=None):
    """Rows (shape, variant, forward and training-step µs, relative errors against "shipped")
    for each shape and each of ``variants`` (names of ``VARIANTS``; "shipped" always first);
    ``on_row(rows)`` after each row."""
    rows = []
    for shape in shapes:
        fn, inputs, grad = _layer(shape, device)
        reference = None
        for name in _names(variants):
            with VARIANTS[name]():
                results, forward, step = _variant_calls(fn, inputs, grad)
                fwd_us, train_us = _time_us(forward, device), _time_us(step, device)
            if reference is None:
                reference = results
            row = dict(shape=shape.label, variant=name, fwd_us=round(fwd_us, 2),
                       train_us=round(train_us, 2),
                       **{f"rel_err_{k}": _rel(r, s) for k, r, s in
                          zip(("y", "grad_x", "grad_w"), results, reference)})
            rows.append(row)
            log(f"{shape.label:36s} {name:36s} fwd {row['fwd_us']:9.2f} µs  train "
                f"{row['train_us']:9.2f} µs  rel err y {row['rel_err_y']:.1e} grad_x "
                f"{row['rel_err_grad_x']:.1e} grad_w {row['rel_err_grad_w']:.1e}")
            if on_row is not None:
                on_row(rows)
    return rows


def save(path, device_name, rows, complete, **extra):
    """Writes the sweep's JSON (``complete`` False while rows are still to come)."""
    with open(path, "w") as f:
        json.dump(dict(device=device_name, torch=torch.__version__,
                       triton=bench._triton_version(), date=datetime.date.today().isoformat(),
                       complete=complete, **extra, rows=rows), f, indent=1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="*", help="keep shapes whose suite/name contains one")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out-dir", default=bench.RESULTS_DIR)
    parser.add_argument("--jobs", type=int, help="compiling processes (default: one per core, "
                        "up to 16)")
    parser.add_argument("--warm-timeout", type=float, default=300.0,
                        help="seconds the compiling processes may take")
    parser.add_argument("--no-warm", action="store_true", help="compile while timing instead")
    parser.add_argument("--warm-shard", metavar="I/N", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.sweep needs a CUDA device (tests run `run` on CPU shapes)")
    device = torch.device("cuda")
    shapes = [s for s in suite(True, device.type)
              if not args.shapes or any(f in s.label for f in args.shapes)]
    if args.warm_shard:      # a compiling process
        index, count = map(int, args.warm_shard.split("/"))
        warm_shard(shapes, args.variants, index, count, device)
        return None
    name = bench.device_name(device)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, bench.slug(name) + "-sweep.json")
    warm = None
    if not args.no_warm:
        start = time.time()
        jobs = args.jobs or min(16, os.cpu_count() or 1)
        commands = [[sys.executable, "-m", "bench.sweep", "--warm-shard", f"{i}/{jobs}",
                     "--shapes", *[s.label for s in shapes], "--variants", *args.variants]
                    for i in range(jobs)]
        codes, outs = gpu_check._run_processes(commands, [gpu_check._env()] * jobs,
                                               [args.warm_timeout] * jobs)
        code = gpu_check._first_failure(codes, outs, 3000)
        warm = dict(exit_code=code, processes=jobs, seconds=round(time.time() - start, 1))
        print(f"-- compiled in {warm['seconds']:.0f} s by {jobs} processes (exit {code})")
    rows = run(shapes, args.variants, device,
               on_row=lambda rows: save(path, name, rows, False, warm_up=warm))
    save(path, name, rows, True, warm_up=warm)
    print(f"written: {path}")
    return rows


if __name__ == "__main__":
    main()
