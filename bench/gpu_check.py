"""`make gpu-check`: everything a lent CUDA machine should run, in one command of < 8 minutes.

    python -m bench.gpu_check [--out-dir bench/results] [--skip-tests] [--skip-compile]
    python -m bench.gpu_check --tests-only --tests tests     # `make test-gpu`: the whole suite,
                                                             # in up to 16 processes

1. the GPU-specific tests on the real kernels (no interpreter), with a time limit, split over
   up to 8 pytest processes (``--jobs``), and, side by side with them, as many processes that
   compile the benchmark's kernels (the Triton providers', and the ``torch.compile``
   providers' on their shapes) into the on-disk caches: most of a GPU test's or a first
   call's time is compiling on the host's cores, and the benchmark would compile one kernel
   after another;
2. a benchmark of conv2d and the Triton providers on the whole suite in bfloat16 and float32;
3. the same steps of conv2d and the triton provider captured in CUDA graphs (bfloat16): the
   kernels alone, which the wall time of a host-bound step hides;
4. the ``torch.compile`` providers on a few shapes (bfloat16);
5. a profile summary per shape and input layout: host time of one ``scd2d`` call against the
   GPU time of its kernels (forward, and forward+backward; the steps of 2 and 3), and the
   costliest kernels of each;
6. the eager baselines (the published formulations, the reference backend) on the suite.
It writes ``<out-dir>/<gpu>.json`` (rows, profile, test summary, seconds per phase) after
every shape and phase, so that a run cut short keeps what it measured, and ``<gpu>.png`` after
every phase; it prints the tables. It needs torch with CUDA and the project installed (``pip
install --no-deps --no-build-isolation -e .``); it uses no network.
"""
import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import traceback

import torch

from bench import run as bench
from bench.shapes import suite

TRITON_PROVIDERS = ("triton", "triton-cl")
CORE_PROVIDERS = ["conv2d", *TRITON_PROVIDERS]
BASELINE_PROVIDERS = ["unfold", "rohrer", "reference"]   # eager: timed last
FAST_PROVIDERS = CORE_PROVIDERS + BASELINE_PROVIDERS
COMPILE_PROVIDERS = ["conv2d", "rohrer+compile"]
COMPILE_SHAPES = ("resnet18/3x3_128_28", "cifar_wide/scs3x3_256-256_8",
                  "cifar10_80_25214/scs5x5_3-80_32")
DTYPES = ["bfloat16", "float32"]
# bf16 numerics, TF32, sync-freedom, CUDA graphs, autocast, NaN, int64 offsets, NCHW backward,
# the buffers and launches of the fused backward (fresh buffers filled with NaN, padded weight
# rows, the workspace in grad_x, skipped gradients, weights of any layout, grad_d in c's memory,
# Python-float p / q filled once and not kept from a CUDA-graph capture), determinism, and the
# tests that ran CPU tensors until the whole suite ran on an H100: 151 tests (before the last
# six names) in 86 s in 8 processes on an H200, beside 11 kernel-compiling ones (2026-12-04);
# the wgrad's position cursor, the prepare's spread sums of squares and strides past int32
# since, (2026-12-07) the Jacobian of a tiny kernel and second derivatives: 192 tests; then the
# kernels' vector units (channel slices, 14×14 NCHW planes), on the GPU their wide accesses: 204;
# then the strided dgrad's carried loop and the zero gradient of pixels no patch reads: 224;
# then the depthwise norms groups-innermost (their layout, a hook that changes it): 231;
# then the weight kernels on a channels_last weight (its memory order): 241; then the forward's
# split K (its determinism on a deep layer, small split layers): 246; then the dgrad's split K
# (the same two): 252; then "auto" taking the reference under a torch.func transform: 253
GPU_TESTS = ("tests/test_kernels.py tests/test_kernels_bwd.py tests/test_kernels_weight.py "
             "tests/test_ops.py tests/test_functional.py tests/test_modules.py -k 'bfloat16 or "
             "tf32 or synchronises or capturable or autocast or nan or int64 or nchw or wide or "
             "fresh or padded or needs_no_grad or any_weight_layout or any_layout or python_float "
             "or c_memory or freed_graph or deterministic or eps_zero or in_place or "
             "zero_input_channels or gpu_tile or shared_p_q or dgrad_goes_first or gpu_blocks or "
             "cursor or sum_of_squares or past_int32 or tiny_kernel or second_derivatives or "
             "vector_units or strided_dilated or groups_innermost or hook_that_changes or "
             "tap_major_workspace or auto_takes_the_reference'")


def _run_processes(commands, envs, timeouts_s):
    """Runs ``commands`` (argv lists, each with its environment in ``envs`` and its time limit
    in ``timeouts_s``) side by side; returns their exit codes ("timeout" for one killed at its
    limit) and outputs."""
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        logs = [open(os.path.join(tmp, f"{i}.log"), "w+") for i in range(len(commands))]
        procs = [subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
                 for cmd, env, log in zip(commands, envs, logs)]
        codes = []
        for proc, timeout_s in zip(procs, timeouts_s):
            try:
                codes.append(proc.wait(timeout=max(1.0, timeout_s - (time.time() - start))))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
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
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "SCD_RECORD_KEYS")}
    env["TRITON_INTERPRET"] = "0"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # bench.pytest_shard
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (root, env.get("PYTHONPATH"))))
    return env


def _test_processes(selection, jobs):
    """The argv lists and environments of ``jobs`` pytest processes, one shard each."""
    command = [sys.executable, "-m", "pytest", "-q", "-rfE", "--tb=short", "-p",
               "no:cacheprovider", "-p", "bench.pytest_shard", *selection]
    env = _env()
    return [command] * jobs, [dict(env, SCD_TEST_SHARD=f"{i}/{jobs}") for i in range(jobs)]


def _test_result(codes, outs, seconds):
    """(exit code or "timeout", the combined summary line) of the test processes."""
    jobs = len(codes)
    codes = [0 if c == 5 and jobs > 1 else c for c in codes]   # 5: a shard got no test
    code = _first_failure(codes, outs, 6000, show_all=jobs == 1)
    return code, _combined_summary(outs, seconds, jobs)


def run_tests(timeout_s, selection=("tests",), jobs=1):
    """The tests on the GPU kernels (no interpreter), split over ``jobs`` pytest processes that
    share the GPU (most of a GPU test's time is compiling kernels on the host's cores); returns
    (exit code or "timeout", the combined summary line, seconds)."""
    start = time.time()
    commands, envs = _test_processes(selection, jobs)
    codes, outs = _run_processes(commands, envs, [timeout_s] * jobs)
    code, summary = _test_result(codes, outs, time.time() - start)
    return code, summary, time.time() - start


def warm_shard(shapes, dtypes, index, count, device, providers=TRITON_PROVIDERS):
    """Makes once every call the benchmark makes of ``providers`` (the oracle check's sample,
    the forward, the training step, at each provider's layouts) for the (shape, dtype) pairs
    ``index``, ``index + count``, …, which compiles their kernels into the on-disk caches
    (Triton's, and Inductor's for the ``torch.compile`` providers); returns those pairs."""
    pairs = [(s, d) for s in shapes for d in dtypes][index::count]
    for shape, dtype_name in pairs:
        dtype = bench.DTYPES[dtype_name]
        for name in providers:
            fn = bench.make_provider(name, shape, device)
            if fn is None:       # not on this device
                continue
            bench.check_against_oracle(name, fn, shape, dtype, device)
            for layout in bench.LAYOUTS.get(name, ("nchw",)):
                for pass_ in bench.PASSES:
                    bench.make_step(fn, shape, dtype, device, pass_, layout)[0]()
    return pairs


def _warm_processes(shapes, dtypes, providers, jobs, compiled):
    """The argv lists of the processes that run :func:`warm_shard` (``--warm-shard i/N``):
    ``jobs`` for the Triton ones of ``providers`` on every shape, one per shape of
    ``COMPILE_SHAPES`` for the torch.compile providers if ``compiled`` (each compile takes tens
    of seconds)."""
    commands = []
    triton = [p for p in providers if p in TRITON_PROVIDERS]
    labels = [s.label for s in shapes]
    if triton:
        commands += [[sys.executable, "-m", "bench.gpu_check", "--warm-shard", f"{i}/{jobs}",
                      "--dtype", *dtypes, "--shapes", *labels, "--warm-providers", *triton]
                     for i in range(jobs)]
    if compiled:
        commands += [[sys.executable, "-m", "bench.gpu_check", "--warm-shard", "0/1", "--dtype",
                      "bfloat16", "--shapes", label, "--warm-providers", *COMPILE_PROVIDERS[1:]]
                     for label in COMPILE_SHAPES if label in labels]
    return commands


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


def profile_summary(shapes, dtype=torch.bfloat16, device=torch.device("cuda")):
    """Per shape and input layout: host and kernel time of the triton provider's forward and
    forward+backward, on the steps the benchmark times (``bench.run.make_step``: x and w in
    the layout, p and q requiring grad), so that the channels_last kernels add up to what
    ``graphed_summary`` times."""
    rows = []
    for shape in shapes:
        fn = bench.make_provider("triton", shape, device)
        for layout in ("nchw", "channels_last"):
            row = dict(shape=shape.label, layout=layout)
            for key, pass_ in zip(("fwd", "train"), bench.PASSES):
                step = bench.make_step(fn, shape, dtype, device, pass_, layout)[0]
                row[f"{key}_host_us"], row[f"{key}_kernel_us"], row[f"{key}_kernels"] = \
                    _host_and_kernel_us(step)
            rows.append(row)
            print(f"{shape.label:40s} {layout:13s} fwd host {row['fwd_host_us']:7.1f} µs kernels "
                  f"{row['fwd_kernel_us']:8.1f} µs | fwd+bwd host {row['train_host_us']:7.1f} µs "
                  f"kernels {row['train_kernel_us']:8.1f} µs")
            print("    fwd+bwd: " + ", ".join(f"{k} {v}" for k, v in row["train_kernels"].items()))
    return rows


def graphed_summary(shapes, dtype=torch.bfloat16, device=torch.device("cuda")):
    """Per shape: conv2d's and the triton provider's step with the host taken out, each captured
    in a CUDA graph and replayed (``do_bench_cudagraph``), channels_last, forward and
    forward+backward: the kernels alone, which wall times of host-bound steps hide."""
    import triton.testing
    rows = []
    for shape in shapes:
        row = dict(shape=shape.label)
        for name in ("conv2d", "triton"):
            fn = bench.make_provider(name, shape, device)
            for pass_ in bench.PASSES:
                step = bench.make_step(fn, shape, dtype, device, pass_, "channels_last")[0]
                step()
                ms = triton.testing.do_bench_cudagraph(step, return_mode="median")
                row[f"{name}_{pass_}_us"] = round(ms * 1e3, 2)
        for pass_ in bench.PASSES:
            row[f"ratio_{pass_}"] = row[f"triton_{pass_}_us"] / row[f"conv2d_{pass_}_us"]
        rows.append(row)
        print(f"{shape.label:40s} kernels only: fwd x{row['ratio_fwd']:.2f}, "
              f"fwd+bwd x{row['ratio_fwd+bwd']:.2f}")
    for pass_ in bench.PASSES:
        print(f"- kernels only, {pass_}: x{bench.geomean([r[f'ratio_{pass_}'] for r in rows]):.2f}")
    return rows


class _Results:
    """The run's results, written to ``<out-dir>/<gpu>.json`` whenever they grow, so that a run
    cut short (a lease's time limit) keeps what it measured."""

    def __init__(self, out_dir, name):
        os.makedirs(out_dir, exist_ok=True)
        self.base = os.path.join(out_dir, bench.slug(name))
        self.start = time.time()
        self.data = dict(device=name, torch=torch.__version__, triton=bench._triton_version(),
                         date=datetime.date.today().isoformat(), complete=False, seconds={},
                         tests=None, warm_up=None, errors=[], graphs=[], profile=[], rows=[])

    @contextlib.contextmanager
    def recording_errors(self, what):
        """Records an exception raised inside (and prints its traceback) instead of raising."""
        try:
            yield
        except Exception as exc:   # noqa: BLE001 (a failed part must not lose the others)
            traceback.print_exc()
            self.data["errors"].append(f"{what}: {exc!r}"[:1000])

    def phase_done(self, phase, phase_start):
        self.data["seconds"][phase] = round(time.time() - phase_start, 1)
        self.save(plot=True)

    def save(self, plot=False):
        self.data["seconds"]["total"] = round(time.time() - self.start, 1)
        with open(self.base + ".json", "w") as f:
            json.dump(self.data, f, indent=1)
        if plot and self.data["rows"]:
            bench.plot(self.data["rows"], self.base + ".png", f"SCD vs conv2d on "
                       f"{self.data['device']}")


def _bench_phase(results, shapes, providers, dtypes, device, keep):
    """Times ``providers`` shape by shape (saving after each); keeps the rows of ``keep``. A
    shape that raises is recorded in the results' errors and the next one runs."""
    for shape in shapes:
        with results.recording_errors(shape.label):
            rows = bench.run([shape], providers, dtypes, device)
            results.data["rows"] += [r for r in rows if r["provider"] in keep]
        results.save()


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
    parser.add_argument("--jobs", type=int, help="pytest processes sharing the GPU, and as "
                        "many kernel-compiling ones beside them (default: up to 8; with "
                        "--tests-only, one per core up to 16: nothing compiles beside them)")
    parser.add_argument("--warm-shard", metavar="I/N", help=argparse.SUPPRESS)
    parser.add_argument("--warm-providers", nargs="*", help=argparse.SUPPRESS)
    parser.add_argument("--shapes", nargs="*", help="keep shapes whose suite/name contains one")
    parser.add_argument("--dtype", nargs="*", choices=DTYPES, default=DTYPES)
    parser.add_argument("--providers", nargs="*", choices=FAST_PROVIDERS, default=FAST_PROVIDERS)
    args = parser.parse_args(argv)
    # a test process compiles its kernels one after another on one core: with nothing beside
    # them, as many processes as cores (8 shards of the suite compile up to 129 distinct
    # kernel variants each, 16 up to 66, counted in the interpreter: bench.pytest_shard)
    args.jobs = args.jobs or min(16 if args.tests_only else 8, os.cpu_count() or 1)
    if not torch.cuda.is_available():
        sys.exit("gpu-check needs a CUDA device")
    shapes = [s for s in suite(True, "cuda")
              if not args.shapes or any(f in s.label for f in args.shapes)]
    device = torch.device("cuda")
    if args.warm_shard:      # a worker of the compile phase
        index, count = map(int, args.warm_shard.split("/"))
        warm_shard(shapes, args.dtype, index, count, device, args.warm_providers)
        # no interpreter teardown: after torch.compile it aborted there on torch 2.11 ("terminate
        # called without an active exception", exit -6) with all the work done
        sys.stdout.flush()
        os._exit(0)
    name = bench.device_name(device)
    print(f"== {name}, torch {torch.__version__}, triton {bench._triton_version()}")
    if args.tests_only:
        code, summary, _ = run_tests(args.test_timeout, shlex.split(args.tests), args.jobs)
        print(f"-- tests: {summary} (exit {code})")
        sys.exit(0 if code == 0 else 1)
    results = _Results(args.out_dir, name)
    phase_start = time.time()
    tests = ([], []) if args.skip_tests else _test_processes(shlex.split(args.tests), args.jobs)
    warm = _warm_processes(shapes, args.dtype, args.providers, args.jobs,
                           compiled=not args.skip_compile)
    print(f"== {len(tests[0])} test processes and {len(warm)} compiling processes side by side")
    codes, outs = _run_processes(tests[0] + warm, tests[1] + [_env()] * len(warm),
                                 [args.test_timeout] * len(tests[0]) + [300.0] * len(warm))
    seconds = time.time() - phase_start
    if tests[0]:
        code, summary = _test_result(codes[:len(tests[0])], outs[:len(tests[0])], seconds)
        results.data["tests"] = dict(exit_code=code, summary=summary)
        print(f"-- tests: {summary} (exit {code})")
    code = _first_failure(codes[len(tests[0]):], outs[len(tests[0]):], 3000)
    results.data["warm_up"] = dict(exit_code=code, processes=len(warm))
    print(f"-- compiled in {seconds:.0f} s (exit {code})")
    results.phase_done("tests_and_compile", phase_start)

    torch.backends.cudnn.benchmark = True
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 1024
    core = [p for p in CORE_PROVIDERS if p in args.providers or p == "conv2d"]
    baselines = [p for p in BASELINE_PROVIDERS if p in args.providers]
    phases = [("benchmark", lambda: _bench_phase(results, shapes, core, args.dtype, device,
                                                 core)),
              ("kernels only (CUDA graphs, bfloat16)",
               lambda: results.data["graphs"].extend(graphed_summary(shapes)))]
    if not args.skip_compile:
        few = [s for s in shapes if s.label in COMPILE_SHAPES]
        phases.append(("torch.compile providers", lambda: _bench_phase(
            results, few, COMPILE_PROVIDERS, ["bfloat16"], device, COMPILE_PROVIDERS[1:])))
    phases.append(("profile (triton, bfloat16)",
                   lambda: results.data["profile"].extend(profile_summary(shapes))))
    if baselines:
        phases.append(("eager baselines", lambda: _bench_phase(
            results, shapes, ["conv2d", *baselines], args.dtype, device, baselines)))
    for phase, run_phase in phases:
        print(f"== {phase}")
        phase_start = time.time()
        with results.recording_errors(phase):
            run_phase()
        results.phase_done(phase, phase_start)
    results.data["complete"] = True
    results.save()     # the last phase_done drew the plot of these rows
    print(f"\n{bench.format_table(results.data['rows'])}\n")
    for error in results.data["errors"]:
        print(f"ERROR {error}")
    print(f"written: {results.base}.json, {results.base}.png "
          f"({results.data['seconds']['total']:.0f} s in all)")
    failed = results.data["errors"] or (results.data["tests"] or {}).get("exit_code", 0) != 0
    if failed:
        sys.exit(1)
    return results.data


if __name__ == "__main__":
    main()
