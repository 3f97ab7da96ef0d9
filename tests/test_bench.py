"""The benchmark driver on one tiny shape per CPU provider: schema, oracle checks, plot."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from bench import run as bench_run
from bench.shapes import Shape

ROW_KEYS = {"suite", "shape", "dtype", "provider", "pass", "ms", "ms_p20", "ms_p80",
            "ratio_to_conv2d", "saved_bytes", "peak_bytes"}


def test_driver_writes_schema_and_plot(tmp_path, monkeypatch):
    tiny = [Shape("tiny", "scs3x3_4-6_6", 2, 4, 6, 6, 6, 3),
            Shape("tiny", "dw3x3_4_6", 2, 4, 4, 6, 6, 3, groups=4),
            Shape("tiny", "k3_4_L16", 2, 4, 4, 1, 16, 3, ndim=1)]
    monkeypatch.setattr(bench_run, "suite", lambda full, device_type: tiny)
    result = bench_run.main(["--device", "cpu", "--out-dir", str(tmp_path), "--min-run-time", "0.01"])
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".png")
    assert os.path.getsize(tmp_path / files[1]) > 1000
    data = json.loads((tmp_path / files[0]).read_text())
    assert {"device", "torch", "triton", "date", "rows"} <= set(data)
    rows = data["rows"]
    cpu_providers = {"conv2d", "unfold", "rohrer", "reference", "reference+compile"}
    assert {r["provider"] for r in rows} == cpu_providers
    assert len(rows) == len(tiny) * len(cpu_providers) * 2
    for r in rows:
        assert ROW_KEYS <= set(r), r
        assert r["matches_oracle"], r
        assert r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        assert r["ratio_to_conv2d"] > 0
        assert (r["saved_bytes"] is None) == (r["pass"] == "fwd")
        assert r["peak_bytes"] > 0, r      # from the profiler's allocation events on CPU
    # ours keeps x, ŵ, c and the norms: less than the formulation with autograd through all ops
    saved = {(r["shape"], r["provider"]): r["saved_bytes"] for r in rows if r["pass"] == "fwd+bwd"}
    assert saved["scs3x3_4-6_6", "reference"] < saved["scs3x3_4-6_6", "rohrer"]
    peak = {(r["shape"], r["provider"]): r["peak_bytes"] for r in rows if r["pass"] == "fwd+bwd"}
    assert peak["scs3x3_4-6_6", "reference"] < peak["scs3x3_4-6_6", "unfold"]
    for r in rows:   # the memory target's measure: (peak − conv2d's) / one output's bytes
        out_bytes = next(s for s in tiny if s.name == r["shape"]).output_numel() * 4
        want = (r["peak_bytes"] - peak[r["shape"], "conv2d"]) / out_bytes
        if r["pass"] == "fwd+bwd":
            assert r["peak_beyond_conv2d_outputs"] == pytest.approx(want), r
    assert "fwd+bwd peak memory beyond conv2d's" in bench_run.format_table(rows)
    assert result["rows"] == rows


def test_every_provider_is_checked_against_the_oracle():
    shape = Shape("tiny", "s", 1, 4, 4, 5, 5, 3)
    for name in ("unfold", "rohrer", "reference"):
        fn = bench_run.make_provider(name, shape, torch.device("cpu"))
        ok, rel = bench_run.check_against_oracle(name, fn, shape, torch.float32,
                                                 torch.device("cpu"))
        assert ok and rel < 1e-5, (name, rel)
    broken = lambda x, w, p, q: bench_run.make_provider("rohrer", shape, x.device)(x, w, p * 1.1, q)
    ok, _ = bench_run.check_against_oracle("rohrer", broken, shape, torch.float32,
                                           torch.device("cpu"))
    assert not ok


def test_default_out_dir_is_git_ignored_and_save_writes_the_committed_dir():
    """`make bench` must not dirty committed files: only --save writes bench/results/."""
    results = os.path.join(os.path.dirname(os.path.abspath(bench_run.__file__)), "results")
    assert bench_run.parse_args([]).out_dir == os.path.join(results, "local")
    assert bench_run.parse_args(["--save"]).out_dir == results
    assert bench_run.parse_args(["--out-dir", "elsewhere"]).out_dir == "elsewhere"
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--save", "--out-dir", "elsewhere"])
    root = os.path.dirname(results)
    if shutil.which("git") is None or subprocess.run(
            ["git", "-C", root, "rev-parse"], capture_output=True).returncode:
        pytest.skip("not a git checkout")
    ignored = lambda path: subprocess.run(["git", "-C", root, "check-ignore", "-q", path]).returncode
    assert ignored(os.path.join(results, "local", "cpu.json")) == 0
    assert ignored(os.path.join(results, "cpu.json")) == 1


def test_gpu_check_names_real_shapes_and_providers():
    """`make gpu-check` runs on a GPU only; here its shape and provider names are checked."""
    from bench import gpu_check
    labels = {s.label for s in bench_run.suite(True, "cuda")}
    assert set(gpu_check.COMPILE_SHAPES) <= labels
    assert set(gpu_check.FAST_PROVIDERS + gpu_check.COMPILE_PROVIDERS) <= set(bench_run.PROVIDERS)
    assert {"triton", "triton-cl", "rohrer+compile"} <= set(gpu_check.FAST_PROVIDERS
                                                          + gpu_check.COMPILE_PROVIDERS)


def test_gpu_check_ranks_kernels_by_device_time():
    from types import SimpleNamespace
    from bench import gpu_check
    events = [SimpleNamespace(key="wgrad", self_device_time_total=700.0),
              SimpleNamespace(key="aten::empty", self_device_time_total=0.0),
              SimpleNamespace(key="dgrad", self_device_time_total=360.0),
              SimpleNamespace(key="prologue", self_device_time_total=240.0)]
    assert gpu_check.per_kernel_us(events, calls=10, top=2) == {"wgrad": 70.0, "dgrad": 36.0}


def test_gpu_tests_are_split_over_processes_and_summed(tmp_path):
    """`make test-gpu` / `make gpu-check` run the selected tests in several pytest processes
    (``bench.pytest_shard``) and report one summary and status."""
    from bench import gpu_check
    (tmp_path / "test_split.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('i', range(4))\n"
        "def test_passes(i):\n    assert i < 4\n"
        "def test_fails():\n    assert False\n"
        "def test_skips():\n    pytest.skip('no')\n")
    code, summary, _ = gpu_check.run_tests(120, [str(tmp_path), "-k", "passes or skips"], jobs=2)
    assert code == 0 and summary.startswith("4 passed, 1 skipped in "), summary
    assert summary.endswith("(2 processes)"), summary
    code, summary, _ = gpu_check.run_tests(120, [str(tmp_path)], jobs=3)
    assert code != 0 and "4 passed" in summary and "1 failed" in summary, summary


def test_shards_keep_tests_that_compile_the_same_kernels_together():
    """Every test lands in one shard; tests sharing kernel variants share a shard, which
    compiles fewer variants than a round-robin split; unknown tests spread; every process
    computes the same split."""
    from bench.pytest_shard import shard_of_each
    # four layers, each launched by three tests (variants 10·layer + 0…3), plus unknown tests
    keys = {f"t{layer}-{k}": {10 * layer + v for v in range(4)} for layer in range(4)
            for k in range(3)}
    ids = sorted(keys) + [f"new{k}" for k in range(4)]
    shards = shard_of_each(ids, keys, 4)
    assert shards == shard_of_each(list(ids), dict(keys), 4)
    assert sorted(set(shards)) == [0, 1, 2, 3]
    for layer in range(4):
        assert len({s for t, s in zip(ids, shards) if t.startswith(f"t{layer}-")}) == 1
    assert sorted(s for t, s in zip(ids, shards) if t.startswith("new")) == [0, 1, 2, 3]

    def busiest(split):
        return max(len(set().union(*[keys.get(t, {t}) for t, s in zip(ids, split) if s == i]))
                   for i in range(4))
    assert busiest(shards) == 5 < busiest([k % 4 for k in range(len(ids))]) == 13


def test_the_compile_key_record_is_written_and_read_back(tmp_path):
    """``SCD_RECORD_KEYS`` records the kernel variants of each test (none for a test that
    launches nothing); the shard plugin reads such a record."""
    from bench.pytest_shard import _load_keys
    (tmp_path / "test_rec.py").write_text(
        "import torch, scd_triton\n"
        "def test_launches():\n"
        "    scd_triton.scd2d(torch.randn(1, 2, 5, 5), torch.randn(2, 2, 3, 3), 2.0, 0.1,\n"
        "                     backend='triton')\n"
        "def test_nothing():\n    assert True\n")
    record = tmp_path / "keys.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TRITON_INTERPRET="1", SCD_RECORD_KEYS=str(record),
               PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
                    "bench.pytest_shard", str(tmp_path / "test_rec.py")], env=env, check=True,
                   cwd=tmp_path, capture_output=True)
    keys = _load_keys(str(record))
    assert keys["test_rec.py::test_nothing"] == set()
    assert len(keys["test_rec.py::test_launches"]) >= 2   # the forward's prepare and GEMM
    assert json.loads(record.read_text())["variants"] == len(keys["test_rec.py::test_launches"])


def test_a_variant_ignores_the_ints_a_kernel_does_not_specialise():
    """The record's variant of a launch: an int the kernel names in ``do_not_specialize`` (the
    forward's batch-dependent ints) does not make a new one; another int's class does."""
    from bench.pytest_shard import _variant

    class Kernel:         # what the recorder reads of a JITFunction
        __name__, arg_names, do_not_specialize = "k", ["X", "M", "N"], ["M"]

    variant = lambda m, n: _variant(Kernel, (torch.empty(1),), (m, n), {}, 4, 1)
    assert variant(32, 7) == variant(31, 7) != variant(32, 16)


def test_the_compile_record_knows_most_collected_tests(request):
    """``bench/test_compile_keys.json`` names most of the suite's tests (all but those that run
    on a GPU only and those added since it was recorded; the command that rewrites it is in
    ``bench/pytest_shard.py``). Checked where the whole suite is collected."""
    from bench.pytest_shard import _load_keys
    strip = lambda nodeid: nodeid.split("tests/", 1)[-1]
    ids = {strip(item.nodeid) for item in request.session.items}
    if len(ids) < 500:
        pytest.skip("needs the whole suite collected")
    known = {strip(t) for t in _load_keys()}
    assert len(ids & known) >= 0.85 * len(ids), sorted(ids - known)[:20]


def test_kernel_warm_up_shards_cover_every_shape_and_dtype_once():
    """`make gpu-check` compiles the Triton providers' kernels in N processes first: their
    shards of (shape, dtype) pairs cover each pair exactly once (on CPU no Triton provider
    runs, so this checks the split only)."""
    from bench import gpu_check
    shapes = bench_run.suite(True, "cuda")[:3]
    dtypes = ["bfloat16", "float32"]
    parts = [gpu_check.warm_shard(shapes, dtypes, i, 4, torch.device("cpu")) for i in range(4)]
    got = sorted((s.label, d) for part in parts for s, d in part)
    assert got == sorted((s.label, d) for s in shapes for d in dtypes)


def test_compile_phase_covers_the_triton_shards_and_each_compile_shape():
    """`make gpu-check` compiles beside its tests: N processes for the Triton providers' shards,
    one per torch.compile shape (none with --skip-compile)."""
    from bench import gpu_check
    shapes = bench_run.suite(True, "cuda")
    commands = gpu_check._warm_processes(shapes, ["bfloat16"], gpu_check.FAST_PROVIDERS, 3,
                                         compiled=True)
    shards = [c[c.index("--warm-shard") + 1] for c in commands if "triton" in c]
    assert shards == ["0/3", "1/3", "2/3"]
    compiled = [c[c.index("--shapes") + 1] for c in commands if "rohrer+compile" in c]
    assert sorted(compiled) == sorted(gpu_check.COMPILE_SHAPES)
    assert len(commands) == 3 + len(gpu_check.COMPILE_SHAPES)
    assert len(gpu_check._warm_processes(shapes, ["bfloat16"], ["conv2d", "triton"], 3,
                                         compiled=False)) == 3


def test_gpu_check_results_are_saved_as_they_grow(tmp_path):
    """A run cut short by a time limit keeps the rows measured so far (CPU rows here)."""
    from dataclasses import replace
    import json
    from bench import gpu_check
    results = gpu_check._Results(str(tmp_path), "CPU test")
    shape = replace(bench_run.suite(True, "cuda")[3], N=1)
    gpu_check._bench_phase(results, [shape], ["conv2d", "reference"], ["float32"],
                           torch.device("cpu"), keep=["reference"])
    saved = json.load(open(results.base + ".json"))
    assert not saved["complete"]
    assert [(r["provider"], r["pass"]) for r in saved["rows"]] == [("reference", "fwd"),
                                                                  ("reference", "fwd+bwd")]
    assert all(r["ratio_to_conv2d"] > 0 for r in saved["rows"])


def test_kernel_only_phase_times_both_passes_of_conv2d_and_triton(monkeypatch):
    """gpu-check's CUDA-graph phase: per shape, conv2d's and triton's forward and training
    step, and their ratios (here on CPU: conv2d stands in for triton, a fake replay timer)."""
    import triton.testing
    from dataclasses import replace
    from bench import gpu_check
    calls = []
    monkeypatch.setattr(bench_run, "make_provider", lambda name, shape, device: (
        lambda x, w, p, q: torch.nn.functional.conv2d(x, w, None, 1, shape.k // 2)))
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph",
                        lambda step, return_mode: calls.append(step()) or 0.5)
    shape = replace(bench_run.suite(True, "cuda")[3], N=1)
    rows = gpu_check.graphed_summary([shape], torch.float32, torch.device("cpu"))
    assert len(calls) == 4                   # conv2d and triton, fwd and fwd+bwd
    assert rows == [dict(shape=shape.label, **{f"{n}_{p}_us": 500.0 for n in ("conv2d", "triton")
                                               for p in ("fwd", "fwd+bwd")},
                         **{"ratio_fwd": 1.0, "ratio_fwd+bwd": 1.0})]


def test_profile_phase_profiles_the_benchmarks_steps_in_both_layouts(monkeypatch):
    """gpu-check's profile: per shape, the forward and the training step that the benchmark
    and the CUDA-graph phase time (x and w in the input layout, p and q requiring grad), once
    per input layout (here on CPU: conv2d stands in for triton, a fake profiler)."""
    from dataclasses import replace
    from bench import gpu_check
    seen = []

    def provider(name, shape, device):
        def fn(x, w, p, q):
            seen.append((x.is_contiguous(), w.is_contiguous(), p.requires_grad, q.requires_grad,
                         torch.is_grad_enabled()))
            return torch.nn.functional.conv2d(x, w, None, 1, shape.k // 2)
        return fn

    monkeypatch.setattr(bench_run, "make_provider", provider)
    monkeypatch.setattr(gpu_check, "_host_and_kernel_us", lambda step: step() or (1.0, 2.0, {}))
    shape = replace(bench_run.suite(True, "cuda")[3], N=1)
    rows = gpu_check.profile_summary([shape], torch.float32, torch.device("cpu"))
    assert [(r["shape"], r["layout"]) for r in rows] == [(shape.label, "nchw"),
                                                          (shape.label, "channels_last")]
    assert rows[0]["train_kernel_us"] == 2.0 and rows[1]["fwd_host_us"] == 1.0
    # forward without grad; training step: one call to make grad_y, one timed; per layout
    nchw, cl = (True, True, False, False, False), (False, False, False, False, False)
    pq = (True, True, True)
    assert seen == [nchw, nchw[:2] + pq, nchw[:2] + pq, cl, cl[:2] + pq, cl[:2] + pq]


def test_per_call_times_the_tiny_layer_against_conv2d(capsys):
    from bench import per_call
    calls = per_call.tiny_layer_calls()
    ys = {name: fn() for name, fn in calls.items()}
    assert ys["scd2d"].shape == ys["rohrer"].shape == ys["conv2d"].shape == (1, 4, 8, 8)
    torch.testing.assert_close(ys["scd2d"], ys["rohrer"])   # the same layer and arguments
    per_call.main(["--rounds", "2"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == ["conv2d", "rohrer", "scd2d"]
    assert lines[1].endswith("1.0× conv2d")


def test_shapes_size_their_outputs_as_conv2d():
    """``Shape.output_numel`` (the memory target's unit, and the FLOP count's) against conv2d
    on meta tensors, for the suite and an odd side at stride 2."""
    from bench.shapes import SUITE
    for s in SUITE + [Shape("odd", "3x3s2_7", 2, 4, 8, 7, 9, 3, stride=2, padding=1)]:
        x = torch.empty(s.N, s.C, *((s.H,) if s.ndim == 2 else ()), s.W, device="meta")
        w = torch.empty(s.O, s.C // s.groups, *(s.k,) * s.ndim, device="meta")
        conv = torch.nn.functional.conv2d if s.ndim == 2 else torch.nn.functional.conv1d
        assert conv(x, w, stride=s.stride, padding=s.padding, groups=s.groups).numel() == \
            s.output_numel(), s


def test_sweep_variants_give_the_shipped_results_and_put_the_launchers_back():
    """`python -m bench.sweep`: every variant runs a step, gives the shipped output and gradients
    (only the blocks change), and leaves the launchers and their plans as they were."""
    from bench import sweep
    from scd_triton.kernels import bwd, fwd, launch, weight
    patched = lambda: (bwd._prologue_blocks, bwd._splits, fwd.gemm_config, fwd.vector_unit,
                       bwd.vector_unit, launch.vector_unit, fwd._block_k, fwd.saved_norm_format,
                       bwd.saved_norm_format, bwd.WGRAD_WS_TAP_MAJOR, fwd.split_k, bwd.split_k,
                       bwd._dgrad_splits, bwd._wgrad_config, weight.w_order)
    originals = patched()
    shape = Shape("test", "tiny", 1, 16, 80, 5, 5, 3)     # BN 128 in the forward: narrowed
    rows = sweep.run([shape], list(sweep.VARIANTS), torch.device("cpu"), log=lambda line: None)
    assert [r["variant"] for r in rows] == list(sweep.VARIANTS)
    for r in rows:
        assert max(r["rel_err_y"], r["rel_err_grad_x"], r["rel_err_grad_w"]) < 1e-4, r
        assert r["fwd_us"] > 0 and r["train_us"] > 0
    assert patched() == originals
    assert bwd._plan.cache_info().currsize == 0
    # the GPU-only candidate: BK 64 for the 16-bit small dgrad of narrow layers
    small = bwd.DGRAD_CONFIGS["small"]
    assert sweep._wide_dgrad_k(small, 40, True) == (*small[:2], 64, *small[3:])
    assert sweep._wide_dgrad_k(small, 96, True) == small
    assert sweep._wide_dgrad_k(small, 40, False) == small
    # the GPU-only candidate: 64-row forward tiles where 128×128 ones run at most 8 K steps
    wide = fwd.gemm_config(128, 128, 1, 3, 1, 32 * 4096, False)
    assert sweep._short_k_forward(wide, 128, 1, 3) == (64, *wide[1:4], 4, wide[5])
    assert sweep._short_k_forward(wide, 128, 3, 3) == wide          # 18 steps


def test_sweep_compiles_each_call_once_across_its_processes_and_saves_row_by_row(tmp_path):
    """`python -m bench.sweep` first compiles in ``--jobs`` processes: their shards make every
    (shape, variant) call once between them, none twice; the timing pass then writes its JSON
    after every row, ``complete`` only at the end (a lease's time limit keeps what ran)."""
    from bench import sweep
    shapes = [Shape("test", "tiny", 1, 16, 16, 5, 5, 3), Shape("test", "wide", 1, 16, 24, 4, 4, 1)]
    variants = ["dgrad K not split", "shipped", "forward K not split"]
    done = [sweep.warm_shard(shapes, variants, i, 2, torch.device("cpu")) for i in range(2)]
    assert sorted(done[0] + done[1]) == sorted((s.label, v) for s in shapes for v in variants)
    assert not set(done[0]) & set(done[1])
    path, seen = tmp_path / "cpu-sweep.json", []

    def on_row(rows):
        sweep.save(path, "cpu", rows, False, warm_up=None)
        seen.append(json.loads(path.read_text()))
    rows = sweep.run(shapes[:1], variants[:2], torch.device("cpu"), log=lambda line: None,
                     on_row=on_row)
    assert [len(data["rows"]) for data in seen] == [1, 2]
    assert [r["variant"] for r in seen[-1]["rows"]] == ["shipped", "dgrad K not split"]
    assert not any(data["complete"] for data in seen)
    sweep.save(path, "cpu", rows, True)
    assert json.loads(path.read_text())["complete"]


def test_aligned_patches_report_what_readme_says():
    """`python -m bench.aligned_patches`: bfloat16 grad_x within SPEC's 1e-2 for loose matches,
    past it once patches nearly equal their kernels (reference and simulated kernels, also
    with c in float32); grad_w within 1e-2 from a float32 grad_ŵ, past it from a bfloat16 one."""
    from bench import aligned_patches as ap
    loose, tight = ap._layer(1.0, 0), ap._layer(0.01, 0)
    assert max(ap.reference_bf16(*loose) + list(ap.kernel_roundings(*loose))) < 1e-2
    ref_x, ref_w = ap.reference_bf16(*tight)
    sim_x, sim_x_c32, sim_w, sim_w_bf16 = ap.kernel_roundings(*tight)
    assert min(ref_x, sim_x, sim_x_c32, sim_w_bf16) > 2e-2 and max(ref_w, sim_w) < 1e-2
