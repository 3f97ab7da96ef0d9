"""A pytest plugin that runs one shard of the collected tests, and records what each test
compiles.

With ``SCD_TEST_SHARD=i/N`` it keeps shard i of N and deselects the rest, so N processes
started alike (``bench.gpu_check.run_tests``) run every test once. On a GPU most of a test's
time is compiling kernel variants, and a variant that two shards need is compiled twice, so the
shards are cut along the kernel variants the tests launch (``COMPILE_KEYS``, recorded in the
interpreter): each test goes, largest first, to the shard where what it adds (a new variant
``KEY_SECONDS``, a test ``TEST_SECONDS``; a test the record does not know counts as one new
variant), counted ``WORK_WEIGHT`` times, plus the shard's estimated time so far is least.
By the interpreter's record of 2026-12-07 (943 variants in 613 tests), the busiest of 16
shards of the whole suite compiles 66 variants instead of the 108 of a round-robin split, of 8
shards 129 instead of 190. Tests that run on a GPU only are skipped in the interpreter, so
the record lacks them (41 of 654): each counts as a variant of its own and they spread as in
a round-robin split. A stale record only costs time: every test still runs once.

With ``SCD_RECORD_KEYS=path`` (and ``TRITON_INTERPRET=1``) it records instead, for every test,
the kernel variants it launches, and writes them to ``path`` at the end of the session:

    TRITON_INTERPRET=1 SCD_RECORD_KEYS=bench/test_compile_keys.json \\
        python -m pytest -q tests -p bench.pytest_shard

A variant is what Triton compiles once: the kernel, its warps and stages, constexprs, tensor
dtypes and how each int argument specialises (1, a multiple of 16, other; not at all where the
kernel says ``do_not_specialize``, as the forward does for the batch's ints). The interpreter's
configs are not the GPU's, but tests that launch the same layer alike share variants on both.
"""
import json
import os

import pytest

COMPILE_KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_compile_keys.json")
KEY_SECONDS = 2.5     # compiling one kernel variant on the lent GPU machines' cores
TEST_SECONDS = 0.3
WORK_WEIGHT = 3.0     # see shard_of_each


def shard_of_each(test_ids, keys_of, count, weight=WORK_WEIGHT):
    """The shard (0 … count − 1) of each of ``test_ids``: greedily, tests with the most
    variants first (``keys_of``: test id -> set of variant ids; unknown ids count as one
    variant of their own), each to the shard where its estimated time, counted ``weight``
    times, plus the shard's time so far is least (ties to the lower index): a shard that
    already compiles a test's variants takes it for its run time alone, until it is that much
    busier than the others. The same for every process that collects the same tests."""
    keys = {t: keys_of.get(t, {("unknown", t)}) for t in test_ids}
    shard_keys = [set() for _ in range(count)]
    seconds = [0.0] * count
    shard = {}
    for t in sorted(test_ids, key=lambda t: (-len(keys[t]), t)):
        def added(i):
            return KEY_SECONDS * len(keys[t] - shard_keys[i]) + TEST_SECONDS
        best = min(range(count), key=lambda i: (seconds[i] + weight * added(i), i))
        seconds[best] += added(best)
        shard_keys[best] |= keys[t]
        shard[t] = best
    return [shard[t] for t in test_ids]


def _load_keys(path=COMPILE_KEYS):
    """test id -> set of variant ids from a record, {} without one."""
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {t: set(ids) for t, ids in json.load(f)["tests"].items()}


@pytest.hookimpl(trylast=True)   # after ``-k`` and ``-m`` deselect
def pytest_collection_modifyitems(config, items):
    shard = os.environ.get("SCD_TEST_SHARD")
    if not shard:
        return
    index, count = map(int, shard.split("/"))
    shards = shard_of_each([item.nodeid for item in items], _load_keys(), count)
    deselected = [item for item, s in zip(items, shards) if s != index]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = [item for item, s in zip(items, shards) if s == index]


def _variant(kernel, tensors, scalars, constexprs, num_warps, num_stages):
    """What Triton compiles a launch as (see the module docstring), as a string."""
    # the decorator's do_not_specialize: a JITFunction's, or the interpreter's kwargs
    fixed = (getattr(kernel, "do_not_specialize", None)
             or getattr(kernel, "kwargs", {}).get("do_not_specialize") or ())
    names = getattr(kernel, "arg_names", [])[len(tensors):len(tensors) + len(scalars)]

    def spec(name, v):
        if isinstance(v, bool) or not isinstance(v, int):
            return type(v).__name__
        if name in fixed:
            return "int"
        return "1" if v == 1 else "16" if v % 16 == 0 else "i"
    name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__",
                                                        type(kernel).__name__)
    return json.dumps([name, num_warps, num_stages, sorted((k, repr(v)) for k, v in
                                                           constexprs.items()),
                       [str(getattr(t, "dtype", None)) for t in tensors],
                       [spec(n, v) for n, v in zip(names or [None] * len(scalars), scalars)]])


class _Recorder:
    """Wraps the kernels' ``launch`` to note each test's variants; writes them at the end."""

    def __init__(self, path):
        from scd_triton.kernels import launch, layout, weight
        self.path, self.test, self.tests, self.ids = path, None, {}, {}
        self.modules, self.launch = (launch, layout, weight), launch.launch
        for module in self.modules:
            module.launch = self.record

    def record(self, kernel, grid, tensors, scalars, constexprs, num_warps, num_stages):
        variant = _variant(kernel, tensors, scalars, constexprs, num_warps, num_stages)
        key = self.ids.setdefault(variant, len(self.ids))
        if self.test is not None:
            self.tests[self.test].add(key)
        return self.launch(kernel, grid, tensors, scalars, constexprs, num_warps, num_stages)

    def pytest_runtest_setup(self, item):
        self.test = item.nodeid
        self.tests.setdefault(item.nodeid, set())

    def pytest_sessionfinish(self):
        for module in self.modules:
            module.launch = self.launch
        with open(self.path, "w") as f:
            json.dump({"variants": len(self.ids),
                       "tests": {t: sorted(ids) for t, ids in sorted(self.tests.items())}}, f,
                      separators=(",", ":"))
            f.write("\n")


def pytest_configure(config):
    path = os.environ.get("SCD_RECORD_KEYS")
    if path:
        config.pluginmanager.register(_Recorder(path), "scd_record_keys")
