"""Host cost of one call on a tiny CPU layer, where the arithmetic is negligible: ``scd2d``
against ``conv2d`` and against the published formulation (``baselines.rohrer_scd2d``: the
formula's torch ops with no validation, the floor of an eager implementation).

    python -m bench.per_call [--rounds 40]

Timings on a shared machine drift by 2× within a minute, so each round times every function
once (fastest of 3 × 200 calls) and the ratios to conv2d are taken within the round; the
report gives medians over rounds.
"""
import argparse
import statistics
import timeit

import torch
import torch.nn.functional as F

import scd_triton

from .baselines import rohrer_scd2d


def tiny_layer_calls():
    """Name -> no-argument call, on x 1×3×8×8 and w 4×3×3×3, padding 1, p = 2, q = 0.1."""
    x, w = torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3)
    p, q = torch.full((4,), 2.0), torch.full((4,), 0.1)
    return {"conv2d": lambda: F.conv2d(x, w, None, 1, 1),
            "rohrer": lambda: rohrer_scd2d(x, w, p, q, (1, 1), (1, 1), 1),
            "scd2d": lambda: scd_triton.scd2d(x, w, 2.0, 0.1, padding=1)}


def per_call(rounds=40, calls=200):
    """Name -> (median µs per call, median ratio to conv2d over rounds)."""
    fns = tiny_layer_calls()
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(min(timeit.repeat(fn, number=calls, repeat=3)) / calls * 1e6)
    return {name: (statistics.median(t), statistics.median(a / b for a, b in
                                                            zip(t, times["conv2d"])))
            for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.rounds} rounds; tiny CPU layer, no grad")
    for name, (us, ratio) in per_call(args.rounds).items():
        print(f"{name:8s} {us:8.1f} µs  {ratio:5.1f}× conv2d")


if __name__ == "__main__":
    main()
