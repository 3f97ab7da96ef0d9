"""`make gpu-check`: everything a lent CUDA machine should run, in one command of < 8 minutes.

    python -m bench.gpu_check [--out-dir bench/results] [--skip-tests] [--skip-compile]
    python -m bench.gpu_check --tests-only --tests tests     # `make test-gpu`: the whole suite

1. the GPU-specific tests on the real kernels (no interpreter), with a time limit, split over
   up to 8 pytest processes (``--jobs``): most of a GPU test's time is compiling kernels;
   then the benchmark's Triton kernels are compiled in as many processes (Triton's cache is on
   disk), so that the benchmark does not compile them one after another;
2. a quick benchmark of every provider on the whole suite in bfloat16 and float32 (the
   ``torch.compile`` providers on a few shapes only: each compile takes tens of seconds);
3. a profile summary per shape: host time of one ``scd2d`` call against the GPU time of its
   kernels (forward, and forward+backward), and the costliest kernels of each.
It writes ``<out-dir>/<gpu>.json`` (rows, profile, test summary) and ``<gpu>.png``, and prints the
tables. It needs torch with CUDA and the project installed (``pip install --no-deps
--no-build-isolation -e .``); it uses no network.
"""
import argparse
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

import torch

from bench import run as bench
from bench.shapes import suite

FAST_PROVIDERS = ["conv2d", "unfold", "rohrer", "reference", "triton", "triton-cl"]
COMPILE_PROVIDERS = ["conv2d", "rohrer+compile"]
COMPILE_SHAPES = ("resnet18/3x3_128_28", "cifar_wide/scs3x3_256-256_8",
                  "cifar10_80_25214/scs5x5_3-80_32")
DTYPES = ["bfloat16", "float32"]
# bf16 numerics, TF32, sync-freedom, CUDA graphs, autocast, NaN, int64 offsets, NCHW backward
# (54 tests, 160 s on an H200, 2026-11-26, most of it kernel compilation), and the buffers,
# layouts and launches changed since (fresh buffers filled with NaN, padded weight rows, the
# workspace in grad_x, skipped gradients, weights of any layout, grad_d in c's memory, Python-
# float p / q filled once and not kept from a CUDA-graph capture; not yet timed on a GPU, hence
# the test time limit of 300 s)
GPU_TESTS = ("tests/test_kernels.py tests/test_kernels_bwd.py tests/test_kernels_weight.py "
             "tests/test_ops.py tests/test_functional.py -k 'bfloat16 or tf32 or synchronises or "
             "capturable or autocast or nan or int64 or nchw or wide or fresh or padded or "
             "needs_no_grad or any_weight_layout or any_layout or python_float or c_memory or "
             "freed_graph'")


def _run_processes(commands, envs, timeout_s):
    """Runs ``commands`` (argv lists, each with its environment in ``envs``) side by side;
    returns their exit codes ("timeout" for one killed at ``timeout_s``) and outputs."""
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        logs = [open(os.path.join(tmp, f"{i}.log"), "w+") for i in range(len(commands))]
        procs = [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
                 for cmd, env, log in zip(commands, envs, logs)]
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=max(1.0, timeout_s - (time.time() - start))))
            except subprocess.TimeoutExpired:
                proc.kill()
                codes.append("timeout")
        outs = []
        for log in logs:
            log.seek(0)
            outs.append(log.read())
            log.close()
    return codes, outs


def _first_failure(codes, outs, tail, show_all=False):
    """Prints the last ``tail`` characters of each failed process's output (of every one with
    ``show_all``); returns the first failing exit code ("timeout" included), else 0."""
    for out, code in zip(outs, codes):
        if code != 0 or show_all:
            print(out[-tail:])
    return next((c for c in codes if c != 0), 0)


def _env():
    """The environment of a child process: the real kernels, and this checkout importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_INTERPRET"] = "0"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # bench.pytest_shard
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
    return env


def run_tests(timeout_s, selection=("tests",), jobs=1):
    """The tests on the GPU kernels (no interpreter), split over ``jobs`` pytest processes that
    share the GPU (most of a GPU test's time is compiling kernels on the host's cores); returns
    (exit code or "timeout", the combined summary line, seconds)."""
    start = time.time()
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "--tb=short", "-p",
               "no:cacheprovider", "-p", "bench.pytest_shard", *selection]
    env = _env()
    codes, outs = _run_processes([command] * jobs,
                                 [dict(env, SCD_TEST_SHARD=f"{i}/{jobs}") for i in range(jobs)],
                                 timeout_s)
    codes = [0 if c == 5 and jobs > 1 else c for c in codes]   # 5: a shard got no test
    code = _first_failure(codes, outs, 6000, show_all=jobs == 1)
    summary = _combined_summary(outs, time.time() - start, jobs)
    return code, summary, time.time() - start


TRITON_PROVIDERS = ("triton", "triton-cl")


def warm_shard(shapes, dtypes, index, count, device):
    """Makes once every call the benchmark makes of the Triton providers (the oracle check's
    one sample, the forward, the training step, at each provider's layout) for the (shape,
    dtype) pairs ``index``, ``index + count``, …, which compiles their kernels into Triton's
    on-disk cache; returns those pairs."""
    pairs = [(s, d) for s in shapes for d in dtypes][index::count]
    for shape, dtype_name in pairs:
        for name in TRITON_PROVIDERS:
            fn = bench.make_provider(name, shape, device)
            if fn is None:       # not on this device
                continue
            for layout in bench.LAYOUTS.get(name, ("nchw",)):
                x, w, p, q = bench.make_inputs(shape, bench.DTYPES[dtype_name], device, layout)
                with torch.no_grad():
                    fn(x[:1], w, p, q)
                    fn(x, w, p, q)
                x.requires_grad_()
                w.requires_grad_()
                y = fn(x, w, p, q)
                torch.autograd.grad(y, (x, w), torch.ones_like(y))
    return pairs


def warm_kernel_cache(shapes, dtypes, jobs, timeout_s):
    """:func:`warm_shard` in ``jobs`` processes side by side (``--warm-shard i/N``), so that the
    benchmark's first Triton calls load compiled kernels instead of compiling them one after
    another (2-3 s each); returns (exit code or "timeout", seconds)."""
    start = time.time()
    labels = [s.label for s in shapes]
    commands = [[sys.executable, "-m", "bench.gpu_check", "--warm-shard", f"{i}/{jobs}",
                 "--dtype", *dtypes, "--shapes", *labels] for i in range(jobs)]
    codes, outs = _run_processes(commands, [_env()] * jobs, timeout_s)
    return _first_failure(codes, outs, 3000), time.time() - start


def _combined_summary(outs, seconds, processes):
    """One pytest-style summary line of several runs' outputs ("3 passed, 1 skipped in ...")."""
    counts = {}
    for out in outs:
        lines = [line for line in out.splitlines() if line.strip()]
        for n, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)",
                                  lines[-1] if lines else ""):
            kind = "error" if kind.startswith("error") else kind
            counts[kind] = counts.get(kind, 0) + int(n)
    parts = ", ".join(f"{n} {kind}" for kind, n in counts.items()) or "no summary"
    return f"{parts} in {seconds:.0f} s ({processes} process{'es' if processes > 1 else ''})"


def _device_us(event):
    """An event's own GPU time (the attribute's name changed across torch versions)."""
    return (getattr(event, "self_device_time_total", None)
            or getattr(event, "self_cuda_time_total", 0))


def per_kernel_us(events, calls, top=8):
    """{kernel name: GPU µs per call} of the ``top`` costliest kernels (profiler averages)."""
    timed = sorted(((e.key, _device_us(e) / calls) for e in events if _device_us(e) > 0),
                   key=lambda kv: -kv[1])
    return {name[:60]: round(us, 1) for name, us in timed[:top]}


def _host_and_kernel_us(step, calls=20):
    """(host µs per call without waiting for the GPU, GPU kernel µs per call, the costliest
    kernels' µs per call) of ``step``."""
    from torch.profiler import ProfilerActivity, profile
    step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        step()
    host = (time.perf_counter() - start) / calls * 1e6
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    return host, sum(_device_us(e) for e in events) / calls, per_kernel_us(events, calls)


def profile_summary(shapes, dtype=torch.bfloat16):
    """Per shape: host and kernel time of the triton provider's forward and forward+backward."""
    device = torch.device("cuda")
    rows = []
    for shape in shapes:
        fn = bench.make_provider("triton", shape, device)
        x, w, p, q = bench.make_inputs(shape, dtype, device)
        def fwd():
            with torch.no_grad():
                fn(x, w, p, q)
        xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
        grad = torch.randn_like(fn(x, w, p, q))
        def train():
            torch.autograd.grad(fn(xg, wg, p, q), (xg, wg), grad)
        row = dict(shape=shape.label)
        row["fwd_host_us"], row["fwd_kernel_us"], row["fwd_kernels"] = _host_and_kernel_us(fwd)
        row["train_host_us"], row["train_kernel_us"], row["train_kernels"] = \
            _host_and_kernel_us(train)
        rows.append(row)
        print(f"{shape.label:40s} fwd host {row['fwd_host_us']:7.1f} µs kernels "
              f"{row['fwd_kernel_us']:8.1f} µs | fwd+bwd host {row['train_host_us']:7.1f} µs "
              f"kernels {row['train_kernel_us']:8.1f} µs")
        print("    fwd+bwd: " + ", ".join(f"{k} {v}" for k, v in row["train_kernels"].items()))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-compile", action="store_true", help="no torch.compile providers")
    parser.add_argument("--tests-only", action="store_true",
                        help="run the tests, print their summary and exit with their status")
    parser.add_argument("--test-timeout", type=float, default=300.0)
    parser.add_argument("--tests", default=GPU_TESTS, help="pytest arguments (one string); "
                        "default: the GPU-specific tests (the whole suite compiles too many "
                        "kernel variants for a short run: use `make test-gpu` for it)")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="pytest (and kernel-compiling) processes sharing the GPU (default: "
                        "up to 8, one per core)")
    parser.add_argument("--warm-shard", metavar="I/N", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", nargs="*", help="keep shapes whose suite/name contains one")
    parser.add_argument("--dtype", nargs="*", choices=DTYPES, default=DTYPES)
    parser.add_argument("--providers", nargs="*", choices=FAST_PROVIDERS, default=FAST_PROVIDERS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu-check needs a CUDA device")
    shapes = [s for s in suite(True, "cuda")
              if not args.shapes or any(f in s.label for f in args.shapes)]
    if args.warm_shard:      # a worker of warm_kernel_cache
        index, count = map(int, args.warm_shard.split("/"))
        warm_shard(shapes, args.dtype, index, count, torch.device("cuda"))
        return None
    start = time.time()
    name = bench.device_name(torch.device("cuda"))
    print(f"== {name}, torch {torch.__version__}, triton {bench._triton_version()}")
    tests = None
    if not args.skip_tests:
        print("== tests (real kernels)")
        code, summary, seconds = run_tests(args.test_timeout, shlex.split(args.tests), args.jobs)
        tests = dict(exit_code=code, summary=summary, seconds=round(seconds, 1))
        print(f"-- tests: {summary} (exit {code})")
        if args.tests_only:
            sys.exit(0 if code == 0 else 1)
    if any(p in TRITON_PROVIDERS for p in args.providers):
        print(f"== compiling the Triton providers' kernels in {args.jobs} processes")
        code, seconds = warm_kernel_cache(shapes, args.dtype, args.jobs, 300)
        print(f"-- compiled in {seconds:.0f} s (exit {code})")
    torch.backends.cudnn.benchmark = True
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 1024
    device = torch.device("cuda")
    print("== benchmark")
    providers = ["conv2d"] + [p for p in args.providers if p != "conv2d"]
    rows = bench.run(shapes, providers, args.dtype, device)
    if not args.skip_compile:
        few = [s for s in shapes if s.label in COMPILE_SHAPES]
        print("== torch.compile providers")
        compiled = bench.run(few, COMPILE_PROVIDERS, ["bfloat16"], device)
        rows += [r for r in compiled if r["provider"] != "conv2d"]
    print("== profile (triton, bfloat16)")
    profile = profile_summary(shapes)
    result = dict(device=name, torch=torch.__version__, triton=bench._triton_version(),
                  date=datetime.date.today().isoformat(), tests=tests, profile=profile, rows=rows)
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, bench.slug(name))
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    bench.plot(rows, base + ".png", f"SCD vs conv2d on {name}")
    print(f"\n{bench.format_table(rows)}\n")
    print(f"written: {base}.json, {base}.png ({time.time() - start:.0f} s in all)")
    return result


if __name__ == "__main__":
    main()
