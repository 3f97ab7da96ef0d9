"""A pytest plugin that runs one shard of the collected tests: with ``SCD_TEST_SHARD=i/N`` it
keeps items i, i + N, i + 2N, … and deselects the rest, so N processes started alike
(``bench.gpu_check.run_tests``) run every test once. Round-robin puts the parametrisations of
one test, which compile the same kernels, side by side. Without the variable it does nothing."""
import os


def pytest_collection_modifyitems(config, items):
    shard = os.environ.get("SCD_TEST_SHARD")
    if not shard:
        return
    index, count = map(int, shard.split("/"))
    deselected = [item for k, item in enumerate(items) if k % count != index]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
    items[:] = items[index::count]
