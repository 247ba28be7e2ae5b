"""lora_linear's contract beyond the numbers: errors, saved tensors, torch.compile, backends."""

import pytest
import torch

import deltakern
from deltakern.benchmark.harness import saved_tensors_bytes
from tests.ops.test_lora import SEED, make_inputs


def args32(m=6, k=13, n=5, r=3, bias=True):
    i = make_inputs((m, k), n, r, bias)
    return [None if i[name] is None else i[name].float() for name in ("x", "weight", "bias", "lora_A", "lora_B")]


def call(x, w, b, a, bb, scaling=1.0, dropout_p=0.0, seed=None):
    return deltakern.lora_linear(x, w, b, a, bb, scaling, dropout_p, seed)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda a: a.__setitem__(0, a[0][:, :12]), "x has 12 input features, weight [out, in] expects in=13"),
        (lambda a: a.__setitem__(3, a[3][:, :12]), "lora_A must be [r, in=13], got (3, 12)"),
        (lambda a: a.__setitem__(4, a[4][:, :2]), "lora_B must be [out=5, r=3], got (5, 2)"),
        (lambda a: a.__setitem__(4, a[4][:4]), "lora_B must be [out=5, r=3], got (4, 3)"),
        (lambda a: a.__setitem__(2, a[2][:4]), "bias must be [out=5], got (4,)"),
        (lambda a: a.__setitem__(3, a[3][:0]), "lora_A has rank r=0"),
        (lambda a: a.__setitem__(3, a[3].double()), "lora_A has dtype torch.float64, expected torch.float32 like x"),
        (lambda a: a.__setitem__(1, a[1].bfloat16()), "weight has dtype torch.bfloat16, expected torch.float32 like x"),
        (lambda a: a.__setitem__(3, a[3].to("meta")), "lora_A is on meta, expected cpu like x"),
        (lambda a: a.__setitem__(1, a[1][0]), "weight must be 2-D, got shape (13,)"),
        (lambda a: a.__setitem__(0, a[0].long()), "x must be a floating-point tensor"),
    ],
    ids=["in-x", "in-A", "r-B", "out-B", "out-bias", "r0", "dtype-A", "dtype-W", "device-A", "rank-W", "int-x"],
)
def test_bad_inputs_name_the_argument(mutate, message):
    a = args32()
    mutate(a)
    with pytest.raises(ValueError, match=r"deltakern\.lora_linear: " + __import__("re").escape(message)):
        call(*a)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_dropout_outside_unit_interval(p):
    with pytest.raises(ValueError, match=r"deltakern\.lora_linear: dropout_p must be a float in \[0, 1\)"):
        call(*args32(), dropout_p=p)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5])
def test_bad_seed(seed):
    with pytest.raises(ValueError, match=r"deltakern\.lora_linear: seed must be an int in \[0, 2\*\*63\)"):
        call(*args32(), dropout_p=0.1, seed=seed)


def test_unsupported_dtype_on_backend():
    a = [None if t is None else t.half() for t in args32()]
    with deltakern.use_backend("cpu"), pytest.raises(ValueError, match="backend 'cpu' computes in float32, bfloat16, float64; got torch.float16"):
        call(*a)


def test_forced_backend_that_cannot_run_names_it():
    with deltakern.use_backend("cuda"), pytest.raises(deltakern.BackendUnavailableError, match="backend 'cuda' is forced but unavailable: it runs CUDA tensors only"):
        call(*args32())


def test_backend_env_var(monkeypatch):
    monkeypatch.setenv("DELTAKERN_BACKEND", "cuda")
    with pytest.raises(deltakern.BackendUnavailableError, match="'cuda'"):
        call(*args32())
    monkeypatch.setenv("DELTAKERN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="DELTAKERN_BACKEND: unknown backend 'nonsense'"):
        call(*args32())


def test_use_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        with deltakern.use_backend("gpu"):
            pass


def test_automatic_choice_on_cpu_is_the_cpu_kernel():
    from deltakern.backend import select_backend

    assert select_backend("lora_linear", "cpu") == "cpu"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_backward_saves_x_and_xa_not_a_mask(backend):
    """Saved for backward, apart from the weights: x itself (no copy), xa [M, r] and the seed; no mask."""
    m, k, n, r = 64, 96, 32, 4
    x, w, b, a, bb = args32(m, k, n, r)
    x.requires_grad_(True)
    a.requires_grad_(True)
    bb.requires_grad_(True)
    x3 = x.view(4, 16, k)
    with deltakern.use_backend(backend):
        saved = saved_tensors_bytes(lambda: call(x3, w, b, a, bb, 2.0, 0.1, SEED), exclude=(w, b, a, bb))
    assert saved == x.nbytes + m * r * 4 + 8  # x, xa and the int64 seed


@pytest.mark.parametrize("compiler, dropout_p", [("aot_eager", 0.0), ("aot_eager", 0.1), ("inductor", 0.1)])
def test_torch_compile_fullgraph(compiler, dropout_p):
    """No graph break, even when the dropout seed is drawn (seed=None): same output and
    gradients as eager for the same torch.manual_seed (inductor draws random numbers with its
    own generator unless fallback_random is set)."""
    import torch._inductor.config

    torch._dynamo.reset()
    x, w, b, a, bb = args32(16, 13, 5, 3)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(a.clone())
            self.b = torch.nn.Parameter(bb.clone())

        def forward(self, x):
            return deltakern.lora_linear(x, w, b, self.a, self.b, 2.0, dropout_p)

    layer = Layer()
    compiled = torch.compile(layer, fullgraph=True, backend=compiler)
    results = []
    with torch._inductor.config.patch(fallback_random=True):
        for fn in (layer, compiled):
            layer.zero_grad()
            torch.manual_seed(11)
            out = fn(x)
            out.sum().backward()
            results.append((out.detach(), [p.grad.clone() for p in layer.parameters()]))
    (eager_out, eager_grads), (out, grads) = results
    torch.testing.assert_close(out, eager_out, atol=1e-6, rtol=1e-6)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_non_contiguous_inputs(backend, dropout_p):
    """Transposed views (GPT-2's Conv1D keeps its weight as [in, out]) give the contiguous result."""
    x, w, b, a, bb = args32(9, 13, 5, 3)
    views = (x.t().contiguous().t(), w.t().contiguous().t(), b, a.t().contiguous().t(), bb.t().contiguous().t())
    assert not any(t.is_contiguous() for t in (views[0], views[1], views[3], views[4]))
    with deltakern.use_backend(backend):
        expected = call(x, w, b, a, bb, 2.0, dropout_p, SEED)
        got = call(*views, 2.0, dropout_p, SEED)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
