"""torch.library registration, torch.compile, backend dispatch and input validation."""
import pytest
import torch

import scd_triton
from helpers import gpu
from scd_triton.functional import resolve_backend


def _args(N=2, C=4, H=6, W=6, O=6, k=3, dtype=torch.float32):
    return torch.randn(N, C, H, W, dtype=dtype), torch.randn(O, C, k, k, dtype=dtype)


def _triton_runs():
    from scd_triton.functional import _triton_interpreter_on
    return torch.cuda.is_available() or _triton_interpreter_on()


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("weight_norm", ["none", "norm", "norm_q"])
def test_opcheck_core_op(weight_norm, backend):
    """The op and its registered backward as torch.compile sees them (schema, fake tensors,
    autograd; outputs that alias each other fail here), on both backends."""
    if backend == "triton" and not _triton_runs():
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    x, _ = _args()
    p, q = torch.rand(6) + 1, torch.rand(6)
    w = torch.randn(6, 2, 3, 3)
    conv = ([1, 1], [1, 1, 0, 1], [1, 1], 2)
    for x_in in (x, x.to(memory_format=torch.channels_last)):
        # without saving, the op is only called where no grad is needed; an input or frozen
        # parameters that need no gradient skip their GEMM
        for save, x_grad, params_grad in ((True, True, True), (False, False, False),
                                          (True, False, True), (True, True, False)):
            tensors = [t.to(device).detach().requires_grad_(params_grad) for t in (x_in, w, p, q)]
            tensors[0].requires_grad_(x_grad)
            args = (*tensors, *conv, 1e-6, 1e-6, weight_norm, 1e-6, backend, save)
            torch.library.opcheck(torch.ops.scd_triton.scd2d_core.default, args)
        y, c, norm = torch.ops.scd_triton.scd2d_core(*tensors, *conv, 1e-6, 1e-6, weight_norm,
                                                     1e-6, backend, True)
        for needs in ((True, True), (False, True), (True, False)):
            torch.library.opcheck(torch.ops.scd_triton.scd2d_core_backward.default,
                                  (torch.randn_like(y), *[t.detach() for t in tensors], c, norm,
                                   *conv, 1e-6, weight_norm, 1e-6, backend, *needs))


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("weight_kind", ["channels_last", "strided"])
@pytest.mark.parametrize("N", [2, 0])
def test_backward_op_matches_its_fake_for_any_weight_layout(N, weight_kind, backend):
    """grad_w comes in the weight's layout (what the fake op promises torch.compile), also for
    a weight that is a strided view and for an empty batch."""
    if backend == "triton" and not _triton_runs():
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    x = torch.randn(N, 4, 6, 6, device=device)
    w = torch.randn(12, 4, 3, 3, device=device).to(memory_format=torch.channels_last)
    w = w[::2] if weight_kind == "strided" else w[:6]
    p, q = torch.rand(6, device=device) + 1, torch.rand(6, device=device)
    conv = ([1, 1], [1, 1, 1, 1], [1, 1], 1)
    y, c, norm = torch.ops.scd_triton.scd2d_core(x, w, p, q, *conv, 1e-6, 1e-6, "norm_q", 1e-6,
                                                 backend, True)
    args = (torch.randn_like(y), x, w, p, q, c, norm, *conv, 1e-6, "norm_q", 1e-6, backend, True)
    torch.library.opcheck(torch.ops.scd_triton.scd2d_core_backward.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    assert torch.ops.scd_triton.scd2d_core_backward(*args)[1].stride() == \
        torch.empty_like(w).stride()


def test_compile_fullgraph_matches_eager():
    net = torch.nn.Sequential(
        scd_triton.SCD2d(3, 8, 3, padding=1),
        scd_triton.MaxAbsPool2d(2),
        scd_triton.SCD2d(8, 8, 3, padding="same", groups=8, shared_weights=True),
        scd_triton.SCD2d(8, 4, 1, parameterization="pisoni"),
    )
    x = torch.randn(2, 3, 8, 8)
    eager = net(x)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    compiled = torch.compile(net, fullgraph=True)(x)
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager)
    for got, want in zip((p.grad for p in net.parameters()), eager_grads):
        torch.testing.assert_close(got, want)


def test_compile_fullgraph_on_the_triton_backend():
    """torch.compile traces a call on the triton backend, also on CPU tensors in Triton's
    interpreter (whose TRITON_INTERPRET check is a constant to Dynamo: tracing Triton's knobs
    failed); the compiled call runs the same kernels, so output and gradients are eager's bits."""
    if not _triton_runs():
        pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w = (t.to(device) for t in _args())
    p, q = torch.full((6,), 2.0, device=device), torch.full((6,), 0.1, device=device)

    def call(x, w, p, q):
        return scd_triton.scd2d(x, w, p, q, padding=1, backend="triton")

    results = []
    for fn in (call, torch.compile(call, backend="aot_eager", fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in (x, w, p, q)]
        y = fn(*leaves)
        y.square().sum().backward()
        results.append([y.detach()] + [t.grad for t in leaves])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_compile_fullgraph_with_a_python_float_p_that_changes():
    """torch.compile makes a Python float that changes between calls dynamic; its validation
    (comparisons, no math.isfinite) traces, and each value gives eager's output."""
    x, w = _args(N=1, C=3, H=6, W=6, O=2)
    compiled = torch.compile(lambda x, w, p: scd_triton.scd2d(x, w, p, 0.1, padding=1),
                             backend="aot_eager", fullgraph=True)
    for p in (2.0, 3.0, 2.5):
        torch.testing.assert_close(compiled(x, w, p), scd_triton.scd2d(x, w, p, 0.1, padding=1))


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("SCD_BACKEND", raising=False)
    assert resolve_backend(None, cpu) == "reference"
    assert resolve_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_backend("auto", torch.device("cuda"), torch.float64) == "reference"
    with pytest.raises(TypeError, match="float64 runs"):
        resolve_backend("triton", cpu, torch.float64)
    monkeypatch.setenv("SCD_BACKEND", "reference")
    assert resolve_backend(None, torch.device("cuda")) == "reference"
    monkeypatch.setenv("SCD_BACKEND", "bogus")
    with pytest.raises(ValueError, match="environment variable SCD_BACKEND must be one of"):
        resolve_backend(None, cpu)
    monkeypatch.setenv("SCD_BACKEND", "")               # empty means unset
    assert resolve_backend(None, cpu) == "reference"
    assert resolve_backend(None, torch.device("cuda")) == "triton"


@pytest.mark.parametrize("value, on", [("0", False), ("", False), ("off", False), ("1", True),
                                       ("true", True), ("ON", True)])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, on):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    if on:
        assert resolve_backend("triton", torch.device("cpu")) == "triton"
    else:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            resolve_backend("triton", torch.device("cpu"))


def test_bfloat16_in_the_interpreter_is_refused(monkeypatch):
    """Triton's interpreter computes bf16 wrongly: a clear error, never a silent garbage result."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w = _args(dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="interpreter, which computes bfloat16 wrongly"):
        scd_triton.scd2d(x, w, 2.0, 0.1, backend="triton")
    assert scd_triton.scd2d(x, w, 2.0, 0.1).dtype == torch.bfloat16      # auto: the reference


BAD_CALLS = [
    # (description, kwargs overriding a valid call, exception, message fragment)
    ("x rank", dict(x=torch.randn(6, 6)), ValueError, "x must be 4-D"),
    ("weight rank", dict(weight=torch.randn(6, 4, 3)), ValueError, "weight must be 4-D"),
    ("int x", dict(x=torch.ones(2, 4, 6, 6, dtype=torch.int64)), TypeError, "x must be float"),
    ("dtype mismatch", dict(weight=torch.randn(6, 4, 3, 3, dtype=torch.float64)), TypeError,
     "weight dtype"),
    ("groups divide", dict(groups=3), ValueError, "divisible by groups"),
    ("weight channels", dict(weight=torch.randn(6, 3, 3, 3)), ValueError, "weight.shape\\[1\\]"),
    ("p shape", dict(p=torch.ones(5)), ValueError, "p must have shape"),
    ("q shape", dict(q=torch.ones(2, 6)), ValueError, "q must have shape"),
    ("p dtype", dict(p=torch.ones(6, dtype=torch.float16)), TypeError, "p must be float32"),
    ("q type", dict(q="0.1"), TypeError, "q must be a float or a tensor"),
    ("stride 0", dict(stride=0), ValueError, "stride must be >= 1"),
    ("stride type", dict(stride=1.5), TypeError, "stride must be an int"),
    ("dilation tuple", dict(dilation=(1, 1, 1)), TypeError, "dilation must be"),
    ("padding negative", dict(padding=-1), ValueError, "padding must be >= 0"),
    ("padding name", dict(padding="full"), ValueError, "padding must be"),
    ("same with stride", dict(padding="same", stride=2), ValueError, "padding='same' needs"),
    ("output size", dict(x=torch.randn(2, 4, 2, 2)), ValueError, "output size"),
    ("backend", dict(backend="cuda"), ValueError, "backend must be"),
    ("groups type", dict(groups=0), ValueError, "groups must be"),
    ("groups bool", dict(groups=True), ValueError, "groups must be"),   # not a cached groups=1
    ("stride bool", dict(stride=(True, 1)), TypeError, "stride must be an int"),
    ("stride float", dict(stride=(1, 1.0)), TypeError, "stride must be an int"),  # == (1, 1)
    ("p bool", dict(p=True), TypeError, "p must be a float or a tensor"),          # == 1.0
    ("eps", dict(eps=-1.0), ValueError, "eps must be"),
    ("eps nan", dict(eps=float("nan")), ValueError, "eps must be a finite float"),
    ("norm_eps inf", dict(norm_eps=float("inf")), ValueError, "norm_eps must be a finite float"),
    ("p zero", dict(p=0.0), ValueError, "p must be a finite float > 0"),
    ("p negative", dict(p=-1.0), ValueError, "p must be a finite float > 0"),
    ("p nan", dict(p=float("nan")), ValueError, "p must be a finite float > 0"),
    ("q negative", dict(q=-0.1), ValueError, "q must be a finite float >= 0"),
    ("q inf", dict(q=float("inf")), ValueError, "q must be a finite float >= 0"),
    ("eps tensor", dict(eps=torch.tensor(1e-6)), TypeError, "eps must be a Python float"),
    # finite Python numbers past float32, the compute dtype of float32 x
    ("p past float32", dict(p=1e39), ValueError, "p must fit in torch.float32"),
    ("q past float32", dict(q=1e300), ValueError, "q must fit in torch.float32"),
    ("eps past float32", dict(eps=1e300), ValueError, "eps must fit in torch.float32"),
    ("norm_eps past float32", dict(norm_eps=1e300), ValueError, "norm_eps must fit"),
    ("p int past float", dict(p=10 ** 400), ValueError, "p must be a finite float > 0"),
    ("empty image", dict(x=torch.randn(2, 4, 0, 6), padding=2), ValueError,
     "x must have non-empty spatial dimensions"),
]


@pytest.mark.parametrize("override, error, match", [pytest.param(*c[1:], id=c[0]) for c in BAD_CALLS])
def test_validation_errors(override, error, match):
    """Each bad argument fails, also right after a valid call of the same shapes, whose
    validation is cached (by type and value: 1, 1.0 and True hash alike)."""
    x, w = _args()
    call = dict(x=x, weight=w, p=1.0, q=0.0, stride=(1, 1), groups=1, backend="reference")
    scd_triton.scd2d(**call)
    call.update(override)
    with pytest.raises(error, match=match):
        scd_triton.scd2d(**call)


def test_validation_runs_once_per_signature_and_again_when_the_environment_changes(monkeypatch):
    """A repeated call is not validated again; a new shape, dtype, p value, $SCD_BACKEND or
    autocast state is; TRITON_INTERPRET is read on every Triton call on CPU."""
    from scd_triton import functional
    plans = []
    plan = functional._plan
    monkeypatch.setattr(functional, "_plan", lambda *a: plans.append(a) or plan(*a))
    monkeypatch.setattr(functional, "_PLANS", {})
    monkeypatch.delenv("SCD_BACKEND", raising=False)
    x, w = _args()
    call = lambda x=x, p=2.0: scd_triton.scd2d(x, w, p, 0.1, padding=1)
    call(), call()
    assert len(plans) == 1
    call(x[:1]), call(p=3.0)
    assert len(plans) == 3
    monkeypatch.setenv("SCD_BACKEND", "bogus")
    with pytest.raises(ValueError, match="SCD_BACKEND must be one of"):
        call()
    monkeypatch.delenv("SCD_BACKEND")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert call().dtype == torch.bfloat16
    assert call().dtype == torch.float32
    from scd_triton.functional import _triton_interpreter_on
    if not _triton_interpreter_on():   # (kernels made for a GPU do not run on CPU tensors)
        return
    tiny = lambda: scd_triton.scd2d(x[:1, :, :4, :4], w, 2.0, 0.1, backend="triton")
    tiny()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        tiny()


def test_fx_symbolic_trace_gets_the_tensor_error():
    """An fx Proxy is not a tensor: the error names x (the cached-validation key is not built)."""
    with pytest.raises(TypeError, match="x must be a tensor, got Proxy"):
        torch.fx.symbolic_trace(lambda x, w: scd_triton.scd2d(x, w, 2.0, 0.1))


def test_device_mismatch_is_reported():
    x, w = _args()
    meta_p = torch.ones(6, device="meta")
    with pytest.raises(RuntimeError, match="p is on meta"):
        scd_triton.scd2d(x, w, meta_p, 0.0)
    with pytest.raises(RuntimeError, match="weight is on meta"):
        scd_triton.scd2d(x, w.to("meta"), 1.0, 0.0)


def test_scd1d_validates_rank():
    with pytest.raises(ValueError, match="x must be 3-D"):
        scd_triton.scd1d(torch.randn(2, 4, 6, 6), torch.randn(3, 4, 3), 1.0, 0.0)


@gpu
@pytest.mark.parametrize("p, q", [(2.0, 0.1), (None, None)])
def test_a_training_step_never_synchronises(p, q):
    """No host-device synchronisation in forward or backward (Python-float or tensor p, q)."""
    layer = scd_triton.SCD2d(8, 16, 3, padding=1, device="cuda")
    x = torch.randn(4, 8, 12, 12, device="cuda", requires_grad=True)
    w = torch.randn(16, 8, 3, 3, device="cuda", requires_grad=True)
    if p is None:
        p, q = torch.full((16,), 2.0, device="cuda"), torch.tensor(0.1, device="cuda")
    scd_triton.scd2d(x, w, p, q, padding=1).sum().backward()     # first call compiles
    layer(x).sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        scd_triton.scd2d(x, w, p, q, padding=1).sum().backward()
        layer(x).sum().backward()
        with torch.no_grad():
            layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
def test_capturable_in_cuda_graphs():
    """torch.compile(mode="reduce-overhead") captures the layer in a CUDA graph; replays match eager."""
    layer = scd_triton.SCD2d(8, 16, 3, padding=1, device="cuda")
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        x = torch.randn(4, 8, 12, 12, device="cuda")
        with torch.no_grad():
            got = compiled(x).clone()
            torch.testing.assert_close(got, layer(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_launches_on_the_tensors_device():
    x, w = torch.randn(2, 4, 6, 6, device="cuda:1"), torch.randn(6, 4, 3, 3, device="cuda:1")
    with torch.cuda.device(0):
        y = scd_triton.scd2d(x, w, 2.0, 0.1, padding=1)
    ref = scd_triton.scd2d(x.cpu(), w.cpu(), 2.0, 0.1, padding=1)
    torch.testing.assert_close(y.cpu(), ref, rtol=1e-3, atol=1e-3)


def test_tuple_subclasses_are_accepted_as_conv_arguments():
    x, w = _args()
    ref = scd_triton.scd2d(x, w, 2.0, 0.1, stride=(1, 1), padding=(1, 1), backend="reference")
    got = scd_triton.scd2d(x, w, 2.0, 0.1, stride=torch.Size([1, 1]), padding=torch.Size([1, 1]),
                           backend="reference")
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_second_derivatives_raise_and_first_derivatives_with_a_graph_do_not(backend):
    """The analytic backward has no derivative. A gradient penalty, autograd.grad of a
    gradient by x or by the cotangent, hessian and grad of grad raise (torch's
    once_differentiable let the first two through as a zero second derivative, y.sum()'s
    grad_y needing no grad); create_graph=True alone still gives the plain gradient, and an
    outer grad that takes an inner gradient as a constant its value."""
    if backend == "triton" and not _triton_runs():
        pytest.skip("the triton backend needs a GPU or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w = (t.to(device) for t in _args(N=1, C=2, H=5, W=5, O=2))
    scd = lambda x, w: scd_triton.scd2d(x, w, 2.0, 0.1, padding=1, backend=backend)
    leaf = lambda t: t.detach().clone().requires_grad_()
    xl, wl = leaf(x), leaf(w)
    y = scd(xl, wl)
    g, = torch.autograd.grad(y.sum(), xl, create_graph=True)
    plain, = torch.autograd.grad(scd(xl, wl).sum(), xl)
    torch.testing.assert_close(g, plain, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="second derivatives"):
        (y.sum() + g.square().sum()).backward()          # a gradient penalty
    xl = leaf(x)
    g, = torch.autograd.grad(scd(xl, w).sum(), xl, create_graph=True)
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(g.sum(), xl)
    y = scd(xl, w)
    cotangent = torch.randn_like(y, requires_grad=True)   # jvp by double backward differentiates
    g, = torch.autograd.grad((y * cotangent).sum(), xl, create_graph=True)   # by the cotangent
    with pytest.raises(RuntimeError, match="second derivatives"):
        torch.autograd.grad(g.sum(), cotangent)
    if backend == "reference":   # the transforms run the reference backend only
        with pytest.raises(RuntimeError, match="second derivatives"):
            torch.autograd.functional.hessian(lambda a: scd(a, w).sum(), x)
        inner = lambda a: torch.func.grad(lambda b: scd(b, w).square().sum())(a)
        with pytest.raises(RuntimeError, match="second derivatives"):
            torch.func.grad(lambda a: inner(a).square().sum())(x)
        # a gradient used as a constant by an outer grad (a learning rate's): no error
        step = lambda lr: (w - lr * torch.func.grad(lambda b: scd(x, b).sum())(w)).square().sum()
        wl = leaf(w)
        grad_w, = torch.autograd.grad(scd(x, wl).sum(), wl)
        lr = torch.tensor(0.5)
        torch.testing.assert_close(torch.func.grad(step)(lr),
                                   -2 * ((w - lr * grad_w) * grad_w).sum())


@pytest.mark.skipif(not _triton_runs(), reason="needs CUDA or TRITON_INTERPRET=1")
def test_auto_takes_the_reference_where_the_kernels_cannot_run():
    """Where "auto" chose the Triton kernels, a torch.func transform or dual tensors run the
    reference backend instead (the call gives the reference's gradients and tangents); where
    the caller named "triton", they raise. Through ``ops.scd2d`` with the plan of a Triton
    call, so that it runs on CPU too (there "auto" always takes the reference)."""
    import torch.autograd.forward_ad as fwAD
    from scd_triton import functional, ops
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x, w = (t.to(device) for t in _args())
    p, q = torch.rand(6, device=device) + 1, torch.rand(6, device=device) * 0.3
    args = functional._plan(x, w, p, q, 1, 1, 1, 1, 1e-12, 1e-12, "triton", 2, "norm_q",
                            None)[0]
    assert args[-1] == "triton"
    reference = (*args[:-1], "reference")
    loss = lambda w, args, auto: ops.scd2d(x, w, p, q, args, auto).square().sum()
    torch.testing.assert_close(torch.func.grad(loss)(w, args, True),
                               torch.func.grad(loss)(w, reference, False), rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="torch.func transforms"):
        torch.func.grad(loss)(w, args, False)
    v = torch.randn_like(x)
    with fwAD.dual_level():
        tangents = [fwAD.unpack_dual(ops.scd2d(fwAD.make_dual(x, v), w, p, q, a, auto)).tangent
                    for a, auto in ((args, True), (reference, False))]
        with pytest.raises(NotImplementedError, match="forward-mode AD"):
            ops.scd2d(fwAD.make_dual(x, v), w, p, q, args, False)
    torch.testing.assert_close(tangents[0], tangents[1], rtol=0, atol=0)
    if torch.cuda.is_available():   # the public call, "auto" by default
        scd = lambda w, backend=None: scd_triton.scd2d(x, w, p, q, padding=1, backend=backend)
        torch.testing.assert_close(torch.func.grad(lambda w: scd(w).sum())(w),
                                   torch.func.grad(lambda w: scd(w, "reference").sum())(w))


def test_forward_mode_runs_the_reference_backend_and_the_triton_backend_refuses_it():
    """Forward-mode AD: torch.func.jvp / jacfwd of a call that saves nothing for backward run
    the reference backend's torch ops (tangents against finite differences); the Triton
    kernels would drop the tangents of dual tensors, so that backend raises."""
    import torch.autograd.forward_ad as fwAD
    x, w = _args(N=1, C=2, H=5, W=5, O=2, dtype=torch.float64)
    v = torch.randn_like(x)
    scd = lambda a, backend="reference": scd_triton.scd2d(a, w, 2.0, 0.1, padding=1,
                                                           backend=backend)
    _, tangent = torch.func.jvp(scd, (x,), (v,))
    finite_difference = (scd(x + 1e-6 * v) - scd(x - 1e-6 * v)) / 2e-6
    torch.testing.assert_close(tangent, finite_difference, rtol=1e-5, atol=1e-7)
    assert torch.func.jacfwd(scd)(x).shape == (1, 2, 5, 5, 1, 2, 5, 5)
    if _triton_runs():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with fwAD.dual_level():
            dual = fwAD.make_dual(x.float().to(device), v.float().to(device))
            with pytest.raises(NotImplementedError, match="forward-mode AD"):
                scd_triton.scd2d(dual, w.float().to(device), 2.0, 0.1, backend="triton")


def test_torch_func_grad_and_vjp_match_autograd():
    """Under torch.func.grad / vjp the op (reference backend) runs as an autograd.Function of
    the transforms' form and gives autograd's gradients, bit for bit; vmap of its forward is
    vmap of torch ops; per-sample gradients (vmap of grad over x) are each sample's autograd
    gradients (to float32 rounding: vmap batches the convolutions); vmap over p writes into
    an unbatched tensor in place and raises torch's error; the Triton backend, asked for by
    name, refuses transforms."""
    x, w = _args()
    p, q = torch.rand(6) + 1, torch.rand(6) * 0.3
    scd = lambda x, w, p, q, backend="reference": scd_triton.scd2d(x, w, p, q, padding=1,
                                                                 backend=backend)
    loss = lambda *a: scd(*a).square().sum()
    grads = torch.func.grad(loss, argnums=(0, 1, 2, 3))(x, w, p, q)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, p, q)]
    for got, want in zip(grads, torch.autograd.grad(loss(*leaves), leaves)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    grad_y = torch.randn_like(scd(x, w, p, q))
    y, vjp = torch.func.vjp(lambda w: scd(x, w, p, q), w)
    torch.testing.assert_close(y, scd(x, w, p, q), rtol=0, atol=0)
    y = scd(*leaves)
    torch.testing.assert_close(vjp(grad_y)[0], torch.autograd.grad(y, leaves[1], grad_y)[0],
                               rtol=0, atol=0)
    xs = torch.stack([x, x.flip(0)])
    torch.testing.assert_close(torch.func.vmap(lambda x: scd(x, w, p, q))(xs),
                               torch.stack([scd(x, w, p, q) for x in xs]), rtol=0, atol=0)
    sample_loss = lambda w, p, q, x: loss(x, w, p, q)      # x [C, H, W]: one sample
    per_sample = torch.func.vmap(torch.func.grad(sample_loss, argnums=(0, 1, 2)),
                                 in_dims=(None, None, None, 0))(w, p, q, x)
    for i, x_i in enumerate(x):
        leaves = [t.detach().clone().requires_grad_() for t in (w, p, q)]
        for got, want in zip(per_sample, torch.autograd.grad(sample_loss(*leaves, x_i), leaves)):
            torch.testing.assert_close(got[i], want)   # vmap batches the convolutions
    with pytest.raises(RuntimeError, match="vmap"):
        torch.func.vmap(lambda p: scd(x, w, p, q))(torch.stack([p, p + 1]))
    if _triton_runs():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with pytest.raises(NotImplementedError, match="backend='reference'"):
            torch.func.grad(lambda w: scd(x.to(device), w, p.to(device), q.to(device),
                                          "triton").sum())(w.to(device))
