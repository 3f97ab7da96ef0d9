"""`make bench`: what an SCD layer costs next to conv2d and next to the published formulations.

    python -m bench.run [--full] [--shapes SUBSTR ...] [--providers NAME ...] [--dtype NAME ...]
                        [--save | --out-dir DIR]

Prints a progress line per measured row, then a table; writes ``<device>.json`` and
``<device>.png`` (time / conv2d time per shape and provider, log scale) to the git-ignored
``bench/results/local/``, or with ``--save`` to the committed ``bench/results/``. Every provider is
checked once against the float64 oracle of the tests before it is timed. 1-D rows run as 2-D
with H = R = 1 for every provider.
"""
import argparse
import datetime
import gc
import json
import math
import os
import re
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import scd_triton
from bench import baselines
from bench.shapes import suite

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import oracle  # noqa: E402  (the test suite's independent float64 oracle)

PROVIDERS = ("conv2d", "unfold", "rohrer", "rohrer+compile", "reference", "reference+compile",
             "triton", "triton-cl")
# input layouts a provider is timed at (the fastest counts); the rest run on NCHW input
LAYOUTS = {"conv2d": ("nchw", "channels_last"), "triton-cl": ("channels_last",)}
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# dense tensor-core peak (TFLOP/s) per dtype, by GPU name fragment; TF32 for float32
PEAK_TFLOPS = {"H100": {"bfloat16": 989, "float16": 989, "float32": 495},
               "H200": {"bfloat16": 989, "float16": 989, "float32": 495},
               "A100": {"bfloat16": 312, "float16": 312, "float32": 156}}
EPS = 1e-12


def _conv_args(shape):
    pad = shape.k // 2 if shape.padding == "same" else shape.padding
    if shape.ndim == 1:
        return (1, shape.stride), (0, pad)
    return (shape.stride,) * 2, (pad,) * 2


def make_inputs(shape, dtype, device, layout="nchw"):
    """x, w, p, q of a shape; ``layout="channels_last"`` lays out x and w so (before timing)."""
    kh = 1 if shape.ndim == 1 else shape.k
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(shape.N, shape.C, shape.H, shape.W, device=device, dtype=dtype)
    w = torch.randn(shape.O, shape.C // shape.groups, kh, shape.k, device=device, dtype=dtype)
    x, w = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
    p = torch.empty(shape.O, device=device).uniform_(1.0, 3.0)
    q = torch.full((shape.O,), 0.1, device=device)
    return x, w, p, q


def make_provider(name, shape, device):
    """A function (x, w, p, q) -> y for provider ``name``, or None where it does not run."""
    stride, padding = _conv_args(shape)
    G = shape.groups
    if name == "conv2d":
        return lambda x, w, p, q: F.conv2d(x, w, None, stride, padding, 1, G)
    if name == "unfold":
        return lambda x, w, p, q: baselines.unfold_scd2d(x, w, p, q, stride, padding, G)
    if name.startswith("rohrer"):
        fn = lambda x, w, p, q: baselines.rohrer_scd2d(x, w, p, q, stride, padding, G)
        return torch.compile(fn, fullgraph=True, dynamic=False) if name.endswith("+compile") else fn
    if name.startswith("triton") and device.type != "cuda":
        return None
    backend = "triton" if name.startswith("triton") else "reference"
    fn = lambda x, w, p, q: scd_triton.scd2d(x, w, p, q, stride, padding, 1, G, backend=backend)
    return torch.compile(fn, fullgraph=True, dynamic=False) if name.endswith("+compile") else fn


def check_against_oracle(name, fn, shape, dtype, device):
    """The provider's output on one sample against the float64 oracle (conv2d: against conv2d),
    on the input layout the provider is timed at (the first of ``LAYOUTS``)."""
    x, w, p, q = make_inputs(shape, dtype, device, LAYOUTS.get(name, ("nchw",))[0])
    x = x[:1]
    y = fn(x, w, p, q).double().cpu()
    stride, padding = _conv_args(shape)
    if name == "conv2d":
        ref = F.conv2d(x.double(), w.double(), None, stride, padding, 1, shape.groups).cpu()
    else:
        ref = oracle.scd2d(x.double().cpu(), w.double().cpu(), p.double().cpu(), q.double().cpu(),
                           stride=stride, padding=(padding[0],) * 2 + (padding[1],) * 2,
                           groups=shape.groups)
    rel = ((y - ref).norm() / ref.norm()).item()
    tol = 2e-3 if dtype == torch.float32 else 2e-2   # TF32 / half rounding on GPU
    return rel <= tol, rel


def _time_cuda(step):
    import triton.testing
    ms = triton.testing.do_bench(step, quantiles=[0.5, 0.2, 0.8])
    return tuple(ms)


def _time_cpu(step, min_run_time):
    from torch.utils import benchmark
    m = benchmark.Timer(stmt="step()", globals={"step": step}).blocked_autorange(
        min_run_time=min_run_time)
    times = np.array(m.times) * 1e3
    return float(np.median(times)), float(np.percentile(times, 20)), float(np.percentile(times, 80))


def peak_bytes(step, device):
    """Bytes a step holds at its peak beyond what existed before it. Earlier steps' garbage is
    collected first and none during the step: the cyclic collector freeing it mid-step made
    the CPU figure vary by an output-sized tensor from run to run."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        if device.type != "cuda":
            return _peak_cpu_bytes(step)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    finally:
        if enabled:
            gc.enable()


def _peak_cpu_bytes(step):
    """Bytes a step holds at its peak beyond what existed before it, from the profiler's
    allocation events (torch's CPU allocator; as ``max_memory_allocated`` gives on CUDA).
    None where this torch's profiler does not expose them."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    try:
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
    except AttributeError:
        return None
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def saved_bytes(fn, x, w, p, q):
    """Bytes autograd keeps for backward (distinct storages), via saved_tensors_hooks."""
    storages = {}
    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x, w, p, q)
    return sum(storages.values())


def make_step(fn, shape, dtype, device, pass_, layout="nchw"):
    """The timed step of ``pass_`` ("fwd": no grad; "fwd+bwd": the gradients of x and w, with
    p and q requiring grad too) on fresh inputs; returns it and its inputs."""
    x, w, p, q = make_inputs(shape, dtype, device, layout)
    if pass_ == "fwd":
        def step():
            with torch.no_grad():
                fn(x, w, p, q)
    else:
        for t in (x, w, p, q):
            t.requires_grad_()
        grad = torch.randn_like(fn(x, w, p, q))
        def step():
            torch.autograd.grad(fn(x, w, p, q), (x, w), grad)
    return step, (x, w, p, q)


def measure(fn, shape, dtype, device, pass_, min_run_time, layout="nchw"):
    step, (x, w, p, q) = make_step(fn, shape, dtype, device, pass_, layout)
    step()  # warm-up (and compile)
    peak = peak_bytes(step, device)
    ms = _time_cuda(step) if device.type == "cuda" else _time_cpu(step, min_run_time)
    saved = saved_bytes(fn, x, w, p, q) if pass_ == "fwd+bwd" else None
    return ms, saved, peak


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run(shapes, providers, dtypes, device, min_run_time=0.2, log=print):
    rows = []
    peak_table = next((v for k, v in PEAK_TFLOPS.items() if k in device_name(device)), None)
    for shape in shapes:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            conv_ms, conv_peak = {}, {}
            out_bytes = shape.output_numel() * dtype.itemsize
            for name in providers:
                fn = make_provider(name, shape, device)
                if fn is None:
                    continue
                ok, rel = check_against_oracle(name, fn, shape, dtype, device)
                for pass_ in PASSES:  # conv2d: cuDNN / oneDNN at its faster layout
                    results = [(layout,) + measure(fn, shape, dtype, device, pass_, min_run_time,
                                                   layout)
                               for layout in LAYOUTS.get(name, ("nchw",))]
                    layout, ms, saved, peak = min(results, key=lambda r: r[1][0])
                    if name == "conv2d":
                        conv_ms[pass_], conv_peak[pass_] = ms[0], peak
                    ratio = ms[0] / conv_ms[pass_] if pass_ in conv_ms else None
                    # a training step's memory target: at most conv2d's peak plus one output
                    beyond = (None if peak is None or conv_peak.get(pass_) is None
                              else (peak - conv_peak[pass_]) / out_bytes)
                    row = dict(suite=shape.suite, shape=shape.name, dtype=dtype_name, provider=name,
                               pass_=pass_, ms=ms[0], ms_p20=ms[1], ms_p80=ms[2],
                               ratio_to_conv2d=ratio, saved_bytes=saved, peak_bytes=peak,
                               peak_beyond_conv2d_outputs=beyond,
                               matches_oracle=ok, oracle_rel_err=rel, layout=layout)
                    row["pass"] = row.pop("pass_")
                    if device.type == "cuda":
                        flops = shape.flops() * (1 if pass_ == "fwd" else 3)
                        row["tflops"] = flops / (ms[0] * 1e-3) / 1e12
                        if peak_table:
                            row["peak_fraction"] = row["tflops"] / peak_table[dtype_name]
                    rows.append(row)
                    log(f"{shape.label:40s} {dtype_name:8s} {name:18s} {pass_:8s} {ms[0]:9.3f} ms"
                        + (f"  x{ratio:.2f} conv2d" if ratio else "")
                        + ("" if ok else f"  ORACLE MISMATCH rel={rel:.1e}"))
    return rows


def geomean(values):
    values = [v for v in values if v]
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else float("nan")


def format_table(rows):
    """Markdown: one line per (shape, dtype), ms and ratio to conv2d per provider and pass."""
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    head = ["shape", "dtype"] + [f"{p} {ps}" for ps in PASSES for p in providers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["suite"], r["shape"], r["dtype"]) for r in rows))
    index = {(r["suite"], r["shape"], r["dtype"], r["provider"], r["pass"]): r for r in rows}
    for key in keys:
        cells = [f"{key[0]}/{key[1]}", key[2]]
        for ps in PASSES:
            for p in providers:
                r = index.get((*key, p, ps))
                cells.append("" if r is None else f"{r['ms']:.3g} ms" if p == "conv2d"
                             else f"{r['ms']:.3g} ms (x{r['ratio_to_conv2d']:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    summary = ["", "geometric mean of time / conv2d time:"]
    for ps in PASSES:
        for p in providers[1:]:
            ratios = [r["ratio_to_conv2d"] for r in rows if r["provider"] == p and r["pass"] == ps]
            summary.append(f"- {p} {ps}: x{geomean(ratios):.2f}")
    summary += ["", "fwd+bwd peak memory beyond conv2d's, in output-sized tensors (target: ≤ 1):"]
    for p in providers[1:]:
        beyond = [(r["peak_beyond_conv2d_outputs"], f"{r['shape']} {r['dtype']}") for r in rows
                  if r["provider"] == p and r["pass"] == "fwd+bwd"
                  and r.get("peak_beyond_conv2d_outputs") is not None]
        if beyond:
            worst = max(beyond)
            summary.append(f"- {p}: ≤ 1 on {sum(b <= 1 for b, _ in beyond)} of {len(beyond)}, "
                           f"the most {worst[0]:.2f} ({worst[1]})")
    return "\n".join(lines + summary)


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(PASSES), 1, figsize=(13, 8), sharex=True)
    labels = list(dict.fromkeys(f"{r['shape']} {r['dtype']}" for r in rows))
    providers = [p for p in PROVIDERS[1:] if any(r["provider"] == p for r in rows)]
    width = 0.8 / max(len(providers), 1)
    for ax, ps in zip(axes, PASSES):
        for i, p in enumerate(providers):
            vals = {f"{r['shape']} {r['dtype']}": r["ratio_to_conv2d"] for r in rows
                    if r["provider"] == p and r["pass"] == ps}
            xs = [j + i * width for j, l in enumerate(labels) if l in vals]
            ax.bar(xs, [vals[l] for l in labels if l in vals], width, label=p)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(f"{ps}: time / conv2d")
        ax.legend(fontsize=8, ncol=len(providers))
    axes[-1].set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    axes[-1].set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LOCAL_RESULTS_DIR = os.path.join(RESULTS_DIR, "local")   # in .gitignore


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="SCD vs conv2d benchmark")
    parser.add_argument("--full", action="store_true", help="full batch sizes on CPU too")
    parser.add_argument("--shapes", nargs="*", help="keep shapes whose suite/name contains one")
    parser.add_argument("--providers", nargs="*", choices=PROVIDERS,
                        help="default: all (on CPU all but rohrer+compile, whose compiles "
                             "would take minutes)")
    parser.add_argument("--dtype", nargs="*", choices=list(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--save", action="store_const", dest="out_dir", const=RESULTS_DIR,
                     help="write to the committed bench/results/")
    out.add_argument("--out-dir", help="where to write (default: the git-ignored "
                                       "bench/results/local/)")
    parser.set_defaults(out_dir=LOCAL_RESULTS_DIR)
    parser.add_argument("--min-run-time", type=float, default=0.2, help="CPU seconds per timing")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    # one compiled provider function per shape and pass: allow that many specialisations
    torch._dynamo.config.recompile_limit = torch._dynamo.config.accumulated_recompile_limit = 1024
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dtypes = args.dtype or (["float32"] if device.type == "cpu" else ["bfloat16", "float16", "float32"])
    shapes = [s for s in suite(args.full, device.type)
              if not args.shapes or any(f in s.label for f in args.shapes)]
    wanted = args.providers or [p for p in PROVIDERS
                                if device.type == "cuda" or p != "rohrer+compile"]
    providers = [p for p in PROVIDERS if p in wanted and p != "conv2d"]
    start = time.time()
    rows = run(shapes, ["conv2d"] + providers, dtypes, device, args.min_run_time)
    name = device_name(device)
    result = dict(device=name, torch=torch.__version__, triton=_triton_version(),
                  date=datetime.date.today().isoformat(), rows=rows)
    os.makedirs(args.out_dir, exist_ok=True)
    base = os.path.join(args.out_dir, slug(name))
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    plot(rows, base + ".png", f"SCD vs conv2d on {name}")
    print(f"\n{name}, torch {torch.__version__}, {time.time() - start:.0f} s\n")
    print(format_table(rows))
    print(f"\nwritten: {base}.json, {base}.png")
    return result


def _triton_version():
    try:
        import triton
        return triton.__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
