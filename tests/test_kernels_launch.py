"""kernels/launch.py: the cached direct launch, driven by stand-ins for a CUDA tensor and a
Triton kernel (no GPU needed; the GPU tests run every kernel through the real path)."""
import os
from types import SimpleNamespace

import pytest
import torch
import triton
import triton.language as tl

from scd_triton.kernels import launch as launch_mod
from scd_triton.kernels._common import advance_cursor, cursor_step, fast_divmod, position_cursor
from scd_triton.kernels.launch import cdiv, divisor_magic, exact_log2, launch, next_power_of_2


class FakeTensor:
    """What ``launch`` reads of a tensor: device, dtype, data_ptr."""

    def __init__(self, ptr, dtype=torch.float16, device="cuda"):
        self.device = SimpleNamespace(type=device, index=0)
        self.dtype, self.ptr = dtype, ptr

    def data_ptr(self):
        return self.ptr


class FakeKernel:
    """Records ordinary launches (``kernel[grid](...)``) and direct ones (``compiled.run``)."""

    def __init__(self, names):
        self.params = [SimpleNamespace(name=n) for n in names]
        self.slow, self.fast = [], []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.slow.append((grid, args, kwargs))
            return SimpleNamespace(run=lambda *a: self.fast.append(a), function=f"fn{len(self.slow)}",
                                   packed_metadata="meta")
        return run


@pytest.fixture
def kernel(monkeypatch):
    monkeypatch.setattr(launch_mod, "driver", SimpleNamespace(active=SimpleNamespace(
        get_current_stream=lambda i: 77 + i, get_current_device=lambda: 0)))
    launch_mod._COMPILED.clear()
    with launch_mod.knobs.runtime.scope():   # knob overrides set by a test end with it
        launch_mod.knobs.runtime.interpret = False   # CI runs under the interpreter
        yield FakeKernel(["X", "Y", "n", "eps", "BLOCK", "FLAG"])
    launch_mod._COMPILED.clear()


def test_second_call_launches_the_cached_kernel_directly(kernel):
    x, y = FakeTensor(1024), FakeTensor(2048)
    launch(kernel, (3, 2), (x, y), (10, 0.5), dict(FLAG=True, BLOCK=64), 4, 2)
    assert len(kernel.slow) == 1 and not kernel.fast
    assert kernel.slow[0][2] == dict(FLAG=True, BLOCK=64, num_warps=4, num_stages=2)
    launch(kernel, (3, 2), (x, y), (10, 0.5), dict(FLAG=True, BLOCK=64), 4, 2)
    assert len(kernel.slow) == 1
    # grid padded to 3-D, the current stream, the compiled function, constexprs in parameter order
    assert kernel.fast == [(3, 2, 1, 77, "fn1", "meta", None, None, None, x, y, 10, 0.5, 64, True)]


@pytest.mark.parametrize("grid", [(1, 65536), (2, 1, 65536)])
def test_a_grid_past_cudas_limit_raises_before_any_launch(kernel, grid):
    """CUDA allows at most 65535 programs along grid axes 1 and 2 (the input gradient's axis 2
    is groups × stride_h × stride_w): an error that says so, not a failed launch."""
    args = ((FakeTensor(1024), FakeTensor(2048)), (16, 0.5), dict(BLOCK=64, FLAG=True), 4, 1)
    with pytest.raises(NotImplementedError, match="65535"):
        launch(kernel, grid, *args)
    assert not kernel.slow and not kernel.fast
    launch(kernel, (70000, 65535, 65535), *args)     # axis 0 has no such limit
    assert len(kernel.slow) == 1


def test_the_current_device_picks_the_compiled_kernel_and_the_stream(kernel, monkeypatch):
    args = ((FakeTensor(1024), FakeTensor(2048)), (16, 0.5), dict(BLOCK=64, FLAG=True), 4, 1)
    launch(kernel, (1,), *args)
    monkeypatch.setattr(launch_mod.driver.active, "get_current_device", lambda: 1)
    launch(kernel, (1,), *args)   # another current device: compiles (loads) there
    launch(kernel, (1,), *args)
    assert len(kernel.slow) == 2 and [call[3:5] for call in kernel.fast] == [(78, "fn2")]


@pytest.mark.parametrize("change", ["alignment", "dtype", "int", "constexpr", "warps"])
def test_anything_that_changes_the_specialisation_compiles_anew(kernel, change):
    args = dict(tensors=(FakeTensor(1024), FakeTensor(2048)), scalars=(16, 0.5),
                constexprs=dict(BLOCK=64, FLAG=False), warps=4)
    launch(kernel, (1,), args["tensors"], args["scalars"], args["constexprs"], args["warps"], 1)
    changed = dict(args)
    if change == "alignment":
        changed["tensors"] = (FakeTensor(1026), FakeTensor(2048))
    elif change == "dtype":
        changed["tensors"] = (FakeTensor(1024, torch.float32), FakeTensor(2048))
    elif change == "int":
        changed["scalars"] = (17, 0.5)
    elif change == "constexpr":
        changed["constexprs"] = dict(BLOCK=128, FLAG=False)
    else:
        changed["warps"] = 8
    launch(kernel, (1,), changed["tensors"], changed["scalars"], changed["constexprs"],
           changed["warps"], 1)
    assert len(kernel.slow) == 2 and not kernel.fast


def test_cpu_tensors_the_interpreter_and_launch_hooks_take_the_ordinary_path(kernel, monkeypatch):
    cpu = (FakeTensor(1024, device="cpu"),)
    for _ in range(2):
        launch(kernel, (1,), cpu, (1,), dict(BLOCK=1, FLAG=1), 4, 1)
    assert len(kernel.slow) == 2 and not kernel.fast
    launch_mod.knobs.runtime.interpret = True   # CUDA tensors, interpreted
    for _ in range(2):
        launch(kernel, (1,), (FakeTensor(1024),), (1,), dict(BLOCK=1, FLAG=1), 4, 1)
    assert len(kernel.slow) == 4 and not kernel.fast
    launch_mod.knobs.runtime.interpret = False
    hook = launch_mod.knobs.runtime.launch_enter_hook
    if hasattr(hook, "add"):   # Triton >= 3.7: a chain of hooks
        monkeypatch.setattr(hook, "calls", [print])
    else:
        launch_mod.knobs.runtime.launch_enter_hook = print
    cuda = (FakeTensor(1024),)
    for _ in range(2):
        launch(kernel, (1,), cuda, (1,), dict(BLOCK=1, FLAG=1), 4, 1)
    assert len(kernel.slow) == 6 and not kernel.fast


def test_integer_helpers_match_triton():
    for n in range(1, 300):
        assert next_power_of_2(n) == triton.next_power_of_2(n)
        assert exact_log2(n) == (n.bit_length() - 1 if n == triton.next_power_of_2(n) else -1)
        for d in (1, 3, 16, 64):
            assert cdiv(n, d) == triton.cdiv(n, d)


DIVISORS = [1, 2, 3, 5, 7, 14, 28, 56, 100, 112, 255, 4096, 65537, 2**30 + 3, 2**31 - 1]


@pytest.mark.parametrize("d", DIVISORS)
def test_divisor_magic_divides_every_int32(d):
    """``(n + (n·mul >> 32)) >> shift == n // d`` on the edges of every quotient near 0, near
    2**31 and at random, in uint32 arithmetic (``mul`` and the sum below 2**32)."""
    mul, shift = divisor_magic(d)
    assert 0 <= mul < 2**32 and 0 <= shift <= 31
    gen = torch.Generator().manual_seed(d)
    random = torch.randint(0, 2**31 - 1, (2000,), generator=gen).tolist()
    edges = [q * d + r for q in range(0, 50) for r in (-1, 0, 1)]
    top = [2**31 - 1 - i for i in range(0, 3 * d + 3, max(1, d // 7))][:200]
    for n in [v for v in edges + top + random if 0 <= v < 2**31]:
        total = n + ((n * mul) >> 32)
        assert total < 2**32 and total >> shift == n // d, (n, d)


@triton.jit
def _divmod_kernel(N, Q, R, d, mul, shift, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    q, r = fast_divmod(tl.load(N + o), d, mul, shift)
    tl.store(Q + o, q)
    tl.store(R + o, r)


def test_fast_divmod_in_a_kernel():
    """The kernel side (``_common.fast_divmod``) on int32 positions up to 2**31 − 1."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("runs a Triton kernel")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = torch.tensor([0, 1, 55, 56, 57, 3135, 3136, 2**31 - 1, 2**31 - 57, 123456789] * 2
                     + [7] * 12, dtype=torch.int32, device=device)
    for d in (1, 3, 56, 3136, 2**31 - 1):
        q, r = torch.empty_like(n), torch.empty_like(n)
        _divmod_kernel[(1,)](n, q, r, d, *divisor_magic(d), BLOCK=32)
        expected = n.long().cpu()
        assert q.long().cpu().tolist() == (expected // d).tolist()
        assert r.long().cpu().tolist() == (expected % d).tolist()


@triton.jit
def _cursor_kernel(OUT, start, OH, OW, dh, dw, stride_h, stride_w, sxn, sxh, sxw, sxg,
                   STEPS: tl.constexpr, STEP: tl.constexpr, WIDE: tl.constexpr):
    """Writes the cursor's (offset, ih, iw) of positions start + arange(STEP) and of each of
    STEPS - 1 moves by STEP: OUT [STEPS, 3, STEP]."""
    o_u, o_ih, o_iw = position_cursor(start + tl.arange(0, STEP), OH, OW, dh, dw, stride_h,
                                      stride_w, sxn, sxh, sxw, sxg, WIDE)
    d_ih, d_iw, step, carry_w, carry_h = cursor_step(STEP, OH, OW, stride_h, stride_w, sxn, sxh,
                                                     sxw, sxg, WIDE)
    o = tl.arange(0, STEP)
    for i in range(STEPS):
        tl.store(OUT + i * 3 * STEP + o, (o_u * sxg).to(tl.int64))
        tl.store(OUT + i * 3 * STEP + STEP + o, o_ih.to(tl.int64))
        tl.store(OUT + i * 3 * STEP + 2 * STEP + o, o_iw.to(tl.int64))
        o_u, o_ih, o_iw = advance_cursor(o_u, o_ih, o_iw, d_ih, d_iw, step, carry_w, carry_h,
                                         OH, OW, dh, dw, stride_h, stride_w)


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("OH, OW, stride, dh, dw, STEP, start", [
    (7, 7, (1, 1), -1, -1, 16, 0),       # steps of 2 rows + 2 columns, row and image carries
    (3, 5, (2, 1), 0, 2, 64, 17),        # several images a step (d_n = 4), a split's start
    (56, 56, (1, 2), 2, -2, 32, 3100),   # columns only, no row move
    (1, 9, (1, 1), 0, 0, 16, 5),         # one output row: every column carry is an image's
    (9, 1, (3, 3), -1, 1, 16, 2),        # one output column
    (4, 4, (1, 1), 1, 1, 16, 0),         # exactly one image a step
])
def test_position_cursor_moves_as_it_decodes(OH, OW, stride, dh, dw, STEP, start, wide):
    """``_common.position_cursor`` moved on by ``advance_cursor`` gives each step's (offset,
    ih, iw) as a fresh decode would, for NHWC-like strides with a common factor."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("runs a Triton kernel")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    H, W = OH * stride[0] + 2, OW * stride[1] + 3
    sxg = 24                                       # channels: x strides are multiples of it
    sxw, sxh, sxn = sxg, (W + 1) * sxg, (H * (W + 1) + 5) * sxg
    steps = 12
    out = torch.empty(steps, 3, STEP, dtype=torch.int64, device=device)
    _cursor_kernel[(1,)](out, start, OH, OW, dh, dw, *stride, sxn, sxh, sxw, sxg, STEPS=steps,
                         STEP=STEP, WIDE=wide)
    k = start + torch.arange(steps * STEP).view(steps, STEP)
    n, oh, ow = k // (OH * OW), k // OW % OH, k % OW
    ih, iw = oh * stride[0] + dh, ow * stride[1] + dw
    assert torch.equal(out[:, 1].cpu(), ih) and torch.equal(out[:, 2].cpu(), iw)
    assert torch.equal(out[:, 0].cpu(), n * sxn + ih * sxh + iw * sxw)
