"""Host side of the launchers: kernel launches that cost little host time, and integer helpers.

``kernel[grid](...)`` re-derives the specialisation of every argument on every call: Triton's
binder alone takes ~13 µs for the forward kernel's 36 arguments on a 2-core x86 host, before
the cache key, the option parsing and the launch. A layer calls its kernels with the same
integers every step, so :func:`launch` keys the compiled kernel by everything its
specialisation depends on (current device, argument values, tensor dtypes and 16-byte
alignment, constexprs, warps, stages, the debug and instrumentation options) and, on a hit,
calls the compiled kernel's launcher directly, as ``JITFunction.run`` does after its lookup
(same call on Triton 3.6 to 3.9). A miss, CPU tensors, the interpreter and installed launch or
stage-inspection hooks take the ordinary path.

``triton.cdiv`` and ``triton.next_power_of_2`` are ``constexpr_function`` objects, ~6 µs a call
from Python; the launchers use :func:`cdiv` and :func:`next_power_of_2` below instead.
"""
from typing import NamedTuple

from triton import knobs
from triton.runtime import driver

_COMPILED = {}   # key -> (kernel, its launcher, function handle, packed metadata, constexprs)
_MAX_ENTRIES = 4096       # a bound for programs that call with ever new sizes
MAX_GRID_YZ = 65535       # CUDA's limit on a grid's second and third dimensions


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def vector_unit(itemsize: int, *values: int) -> int:
    """The largest power of two up to 16 bytes' worth of elements that divides every value (0
    counts as a multiple): what ``_common.in_units`` may tell a kernel about sizes and strides
    along which it loads or stores contiguous runs. 1 where every value is a multiple of 16,
    which Triton's specialisation of int arguments already tells the compiler (the kernel is
    then the one it was without units)."""
    if all(v % 16 == 0 for v in values):
        return 1
    unit = 16 // itemsize
    while unit > 1 and any(v % unit for v in values):
        unit //= 2
    return unit


def channel_unit(itemsize: int, Cg: int, strides: tuple) -> int:
    """The vector unit of a kernel that reads or writes a [N, C, H, W] tensor of ``strides``
    along its channels, in groups of ``Cg``: of Cg and the sample, row and column strides when
    the channels are contiguous, else 1."""
    sn, sc, sh, sw = strides
    return vector_unit(itemsize, Cg, sn, sh, sw) if sc == 1 else 1


def divisor_magic(d: int) -> tuple:
    """``(mul, shift)`` with ``(n + ((n · mul) >> 32)) >> shift == n // d`` for ``0 ≤ n <
    2**31`` (``_common.fast_divmod``): Granlund and Montgomery's ``M = ⌈2**(32 + ℓ) / d⌉``, ``ℓ
    = ⌈log2 d⌉``, lies in [2**32, 2**33), so ``n · M >> (32 + ℓ)`` is the 32-bit form with
    ``mul = M − 2**32 < 2**32`` and ``shift = ℓ`` (the sum stays below 2**32)."""
    shift = (d - 1).bit_length()
    return -(-(1 << (32 + shift)) // d) - (1 << 32), shift


def exact_log2(n: int) -> int:
    """log2(n) when n is a power of two, else -1: a kernel's shift instead of a division."""
    return n.bit_length() - 1 if n > 0 and n & (n - 1) == 0 else -1


def _active(hook):
    """A launch hook is installed: a function (Triton 3.6) or a non-empty chain (3.9)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _ordinary(first, runtime):
    """Calls that take Triton's own path: CPU tensors, the interpreter, hooks installed."""
    return (first.device.type != "cuda" or runtime.interpret or _active(runtime.launch_enter_hook)
            or _active(runtime.launch_exit_hook)
            or getattr(runtime, "add_stages_inspection_hook", None) is not None)


def launch(kernel, grid, tensors, scalars, constexprs, num_warps, num_stages):
    """``kernel[grid](*tensors, *scalars, **constexprs, num_warps=..., num_stages=...)``.

    ``tensors`` are the kernel's leading pointer parameters, ``scalars`` the int / float ones
    after them (a given slot keeps its Python type across calls), ``constexprs`` every remaining
    parameter by name. Like Triton, it launches on the current device and stream.
    """
    runtime = knobs.runtime
    if _ordinary(tensors[0], runtime):
        kernel[grid](*tensors, *scalars, **constexprs, num_warps=num_warps, num_stages=num_stages)
        return
    if len(grid) > 1 and max(grid[1:]) > MAX_GRID_YZ:
        raise NotImplementedError(
            f"{getattr(kernel, '__name__', kernel)} would launch {grid} programs: CUDA allows at "
            f"most {MAX_GRID_YZ} along grid axes 1 and 2 (e.g. the input gradient's axis 2 is "
            f"groups × stride_h × stride_w); not supported")
    compilation = knobs.compilation
    device = driver.active.get_current_device()
    key = (id(kernel), device, num_warps, num_stages, runtime.debug,
           getattr(compilation, "instrumentation_mode", None),
           getattr(compilation, "fpsan_homomorphic_casts", None), scalars,
           tuple(constexprs.values()),
           tuple([(t.dtype, t.data_ptr() % 16 == 0) for t in tensors]))   # list: 2x a genexpr
    entry = _COMPILED.get(key)
    if entry is None:
        compiled = kernel[grid](*tensors, *scalars, **constexprs, num_warps=num_warps,
                                num_stages=num_stages)
        if hasattr(compiled, "result"):     # an asynchronous compile (Triton 3.6)
            compiled = compiled.result()
        if compiled is None:
            return
        tail = tuple(constexprs[p.name] for p in kernel.params[len(tensors) + len(scalars):])
        if len(_COMPILED) >= _MAX_ENTRIES:
            _COMPILED.clear()
        _COMPILED[key] = (kernel, compiled.run, compiled.function, compiled.packed_metadata, tail)
        return
    _, run, function, metadata, tail = entry
    grid = (*grid, 1, 1)
    run(grid[0], grid[1], grid[2], driver.active.get_current_stream(device), function, metadata,
        None, None, None, *tensors, *scalars, *tail)


class Launch(NamedTuple):
    """A launch a launcher works out once per layer: the runtime ints before and after the
    tensor strides, which are taken at call time."""
    kernel: object
    grid: tuple
    head: tuple
    tail: tuple
    constexprs: dict
    warps: int
    stages: int

    def __call__(self, tensors, strides):
        launch(self.kernel, self.grid, tensors, (*self.head, *strides, *self.tail),
               self.constexprs, self.warps, self.stages)
