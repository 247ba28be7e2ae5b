"""Backend choice under torch.compile: a change of ``use_backend``/``DELTAKERN_BACKEND`` after
compiling recompiles (dynamo guards on both), and calls with the same backend do not.

The compiled functions use ``Recorder``, a ``torch.compile`` backend that runs dynamo's graph as
is (what ``backend="eager"`` does) and notes which deltakern op each graph that runs calls. That
keeps compile time to dynamo's own (inductor on 2 CPU cores would take far longer) and still
exercises everything under test: guards are built and checked by dynamo, before and whatever
the backend. One test uses ``aot_eager`` to show the same with AOTAutograd in the way.
"""

import threading

import pytest
import torch
from torch._dynamo.utils import counters

import deltakern
from deltakern import backend
from deltakern.backend import ENV_VAR, forced_backend, select_backend, unavailable_reason

needs_cpu_kernels = pytest.mark.skipif(
    unavailable_reason("cpu", "cpu") is not None, reason=str(unavailable_reason("cpu", "cpu"))
)

# The op each backend's graph calls for CPU tensors; the reference backend calls none.
_BACKEND_OF_OP = {
    "deltakern.lora_linear_fwd.default": "cpu",
    "deltakern.lora_linear_fwd_triton.default": "triton",
}


class Recorder:
    """A torch.compile backend: runs each graph unchanged and appends, per run, the backend whose
    op the graph calls ("reference" if none) to ``ran``; ``compiled`` counts the graphs made."""

    def __init__(self):
        self.ran: list[str] = []
        self.compiled = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.compiled += 1
        ops = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
        found = sorted({_BACKEND_OF_OP[op] for op in ops if op in _BACKEND_OF_OP}) or ["reference"]
        (name,) = found

        def run(*args):
            self.ran.append(name)
            return gm.forward(*args)

        return run


@pytest.fixture(autouse=True)
def fresh_dynamo(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 8, generator=g)
    w, a, b = (torch.randn(shape, generator=g) for shape in ((6, 8), (2, 8), (6, 2)))
    return x, w, a, b


def compiled_lora(backend, fullgraph=True):
    x, w, a, b = inputs()

    def fn(x):
        return deltakern.lora_linear(x, w, None, a, b, 0.5) * 2.0

    return torch.compile(fn, backend=backend, fullgraph=fullgraph), fn, x


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@needs_cpu_kernels
def test_use_backend_change_recompiles_and_same_backend_does_not():
    rec = Recorder()
    compiled, eager, x = compiled_lora(rec)
    expected = eager(x)
    for name in ("reference", "cpu", "reference", "cpu"):
        with deltakern.use_backend(name):
            torch.testing.assert_close(compiled(x), expected)
        assert rec.ran[-1] == name
    assert rec.compiled == 2  # one graph per backend, reused when switching back
    compiled(x)  # automatic choice: cpu, but its own guard (nothing forced), so one more graph
    assert rec.ran[-1] == "cpu" and rec.compiled == 3
    graphs = unique_graphs()
    for name in ("reference", None, "cpu", None, "reference"):
        for _ in range(3):
            if name is None:
                compiled(x)
            else:
                with deltakern.use_backend(name):
                    compiled(x)
            assert rec.ran[-1] == (name or "cpu")
    assert unique_graphs() == graphs and rec.compiled == 3  # no recompile without a change


@pytest.mark.parametrize("compiler, fullgraph", [("recorder", True), ("recorder", False), ("aot_eager", True)])
def test_forcing_an_unavailable_backend_after_compiling_raises(compiler, fullgraph):
    """Raised as itself (not wrapped by dynamo), and without fullgraph no graph break is left."""
    rec = Recorder()
    compiled, eager, x = compiled_lora(rec if compiler == "recorder" else compiler, fullgraph)
    with deltakern.use_backend("reference"):
        torch.testing.assert_close(compiled(x), eager(x))
    graphs = unique_graphs()
    for _ in range(2):  # not cached as a success; raised each time as eager code does
        with deltakern.use_backend("cuda"), pytest.raises(
            deltakern.BackendUnavailableError,
            match="lora_linear: backend 'cuda' is forced but unavailable: it runs CUDA tensors only",
        ):
            compiled(x)
    with deltakern.use_backend("reference"):
        torch.testing.assert_close(compiled(x), eager(x))
    assert unique_graphs() == graphs
    if compiler == "recorder":
        rec.ran.clear()
        compiled(x)  # nothing forced: one more whole graph, as if the error had not happened
        assert rec.ran == [select_backend("lora_linear", "cpu")] and unique_graphs() == graphs + 1


@needs_cpu_kernels
def test_env_var_change_recompiles(monkeypatch):
    rec = Recorder()
    compiled, eager, x = compiled_lora(rec)
    compiled(x)
    assert rec.ran[-1] == "cpu"  # automatic choice, environment variable unset

    monkeypatch.setenv(ENV_VAR, "reference")
    compiled(x)
    assert rec.ran[-1] == "reference"

    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(deltakern.BackendUnavailableError, match="backend 'cuda' is forced but unavailable"):
        compiled(x)
    monkeypatch.setenv(ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match="DELTAKERN_BACKEND: unknown backend 'nonsense'"):
        compiled(x)

    monkeypatch.setenv(ENV_VAR, "cuda")
    with deltakern.use_backend("reference"):  # use_backend wins over the environment variable
        compiled(x)
    assert rec.ran[-1] == "reference"

    monkeypatch.delenv(ENV_VAR)
    compiled(x)
    assert rec.ran[-1] == "cpu"
    monkeypatch.setenv(ENV_VAR, "reference")
    compiled(x)
    assert rec.ran[-1] == "reference"

    graphs, made = unique_graphs(), rec.compiled
    monkeypatch.setenv("DELTAKERN_SOME_OTHER_VARIABLE", "1")  # other variables are not guarded on
    compiled(x)
    assert rec.ran[-1] == "reference"
    assert (unique_graphs(), rec.compiled) == (graphs, made)


@needs_cpu_kernels
def test_forced_backend_is_per_thread_under_compile():
    """use_backend is a context variable: the guard reads it in the calling thread."""
    rec = Recorder()
    compiled, _, x = compiled_lora(rec)
    seen = []

    def other_thread():
        compiled(x)  # a new thread's context: nothing forced
        seen.append(rec.ran[-1])

    with deltakern.use_backend("reference"):
        compiled(x)
        assert rec.ran[-1] == "reference"
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        compiled(x)
        assert rec.ran[-1] == "reference"
    assert seen == ["cpu"]


def test_eager_choice_is_unchanged(monkeypatch):
    assert forced_backend() is None
    assert select_backend("lora_linear", "cpu") == ("cpu" if unavailable_reason("cpu", "cpu") is None else "reference")
    monkeypatch.setenv(ENV_VAR, " reference ")
    assert forced_backend() == select_backend("lora_linear", "cpu") == "reference"
    with deltakern.use_backend("triton"):
        assert forced_backend() == "triton"
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(deltakern.BackendUnavailableError) as raised:
        select_backend("lora_linear", "cpu")
    assert type(raised.value) is deltakern.BackendUnavailableError  # not the compile-time subclass
    monkeypatch.setenv(ENV_VAR, "gpu")
    with pytest.raises(ValueError, match="DELTAKERN_BACKEND: unknown backend 'gpu'") as raised:
        forced_backend()
    assert type(raised.value) is ValueError


@needs_cpu_kernels
def test_without_context_var_support_the_choice_is_baked_in(monkeypatch):
    """On a torch whose dynamo cannot trace ContextVar.get() the whole choice is one constant, as
    before: still no graph break, but a change of backend needs torch.compiler.reset()."""
    monkeypatch.setattr(backend, "_dynamo_guards_context_vars", lambda: False)
    rec = Recorder()
    compiled, _, x = compiled_lora(rec)
    with deltakern.use_backend("reference"):
        compiled(x)
    with deltakern.use_backend("cpu"):
        compiled(x)
    assert rec.ran == ["reference", "reference"]
    torch.compiler.reset()
    with deltakern.use_backend("cpu"):
        compiled(x)
    assert rec.ran[-1] == "cpu"


@pytest.mark.skipif(unavailable_reason("cpu", "cpu") is not None, reason="needs the extension's CPU kernels")
def test_an_op_missing_from_the_extension_falls_back_or_names_the_rebuild():
    """An extension built before an op was added loads, but has no kernels of that op: the
    automatic choice takes the next backend, a forced one says to rebuild."""
    assert select_backend("lora_linear", "cpu") == "cpu"
    assert select_backend("newer_linear", "cpu") == "reference"
    with deltakern.use_backend("cpu"), pytest.raises(deltakern.BackendUnavailableError,
                                                     match="deltakern._C has no newer_linear kernels"):
        select_backend("newer_linear", "cpu")


@needs_cpu_kernels
def test_the_automatic_choice_skips_a_backend_without_the_dtype():
    """fp16 on the CPU: the cpu kernels do not compute in it, so every op's automatic choice is the
    next backend, reference (a PEFT model cast to fp16 keeps working after ``deltakern.patch``);
    fp64 on CUDA likewise (triton and cuda lack it). Only a forced backend raises, naming its dtypes."""
    from deltakern.registry import ops

    for op in ops():
        assert select_backend(op, "cpu", torch.float16) == "reference", op
        assert select_backend(op, "cpu", torch.float32) == "cpu", op
        assert select_backend(op, "cpu", torch.bfloat16) == "cpu", op
        assert select_backend(op, "cuda", torch.float64) == "reference", op
    g = torch.Generator().manual_seed(0)
    x, weight = torch.randn(5, 12, generator=g).half(), torch.randn(7, 12, generator=g).half()
    lora_A, lora_B = torch.randn(3, 12, generator=g).half(), torch.randn(7, 3, generator=g).half()
    y = deltakern.lora_linear(x, weight, None, lora_A, lora_B, 0.5)
    with deltakern.use_backend("reference"):
        expected = deltakern.lora_linear(x, weight, None, lora_A, lora_B, 0.5)
    assert y.dtype == torch.float16 and torch.equal(y, expected)
    with deltakern.use_backend("cpu"), pytest.raises(ValueError, match="backend 'cpu' computes in float32, bfloat16, "
                                                                        "float64; got torch.float16"):
        deltakern.lora_linear(x, weight, None, lora_A, lora_B, 0.5)
