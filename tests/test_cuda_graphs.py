"""A fused model's CUDA inference forward replayed from CUDA graphs (``model.cuda_graphs = True``;
shvit_kernels.replay.CudaGraphReplay). The replay itself needs a GPU (the GPU check runs these tests); the
rules that decide when it may run are checked everywhere."""

import copy
import pickle

import pytest
import torch

import shvit
from shvit import bench
from shvit_kernels.replay import CudaGraphReplay, graph_replayable

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _fused_s1(device="cpu", dtype=torch.float32, graphs=False):
    torch.manual_seed(0)
    model = shvit.create_model("shvit_s1").eval()
    bench._randomize_bn(model)
    model = shvit.fuse(model).to(device, dtype)
    model.cuda_graphs = graphs
    return model


def _module_path(model, x):
    with torch.inference_mode():
        return model.forward_head(model._module_features(*model._enter(x)))


def _graphs(model):
    return [r for r, _ in model.__dict__.get("_cuda_graphs", {}).values()]


def test_cuda_graphs_are_off_by_default_and_never_taken_on_the_cpu():
    assert shvit.create_model("shvit_s1").cuda_graphs is False
    model = _fused_s1(graphs=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert not graph_replayable(x)
        assert torch.equal(model(x), _module_path(model, x))
    assert _graphs(model) == []


def test_captured_graphs_stay_out_of_copies_pickles_and_moves():
    class Uncopyable:
        def __deepcopy__(self, memo):
            raise AssertionError("a captured graph was copied")

        def __reduce__(self):
            raise AssertionError("a captured graph was pickled")

    model = _fused_s1()
    model.__dict__["_cuda_graphs"] = {"signature": (Uncopyable(), None)}
    assert "_cuda_graphs" not in copy.deepcopy(model).__dict__
    assert "_cuda_graphs" not in pickle.loads(pickle.dumps(model)).__dict__
    model.to(torch.bfloat16)  # recorded for the old dtype
    assert "_cuda_graphs" not in model.__dict__


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graphed_forward_matches_the_module_path_and_returns_fresh_outputs(dtype):
    model = _fused_s1("cuda", dtype, graphs=True)
    x, y = (torch.randn(4, 3, 128, 128, device="cuda", dtype=dtype) for _ in range(2))
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    with torch.inference_mode():
        first = model(x)  # captures
        (replay,) = _graphs(model)
        assert replay is not None
        kept = first.clone()
        second = model(y)  # replays
        features = model.forward_features(x)
    torch.testing.assert_close(first, _module_path(model, x), **tol)
    torch.testing.assert_close(second, _module_path(model, y), **tol)
    assert torch.equal(first, kept), "a later replay overwrote an earlier result"
    with torch.no_grad():  # captured under inference_mode, replayed under no_grad: same input buffer
        torch.testing.assert_close(model(y), second, rtol=0, atol=0)
    with torch.inference_mode():
        torch.testing.assert_close(features, model._like_input(model._module_features(*model._enter(x)), x), **tol)


@gpu
@pytest.mark.gpu
def test_graphs_follow_weight_changes_new_shapes_and_stay_few():
    model, x = _fused_s1("cuda", graphs=True), torch.randn(2, 3, 64, 64, device="cuda")
    with torch.inference_mode():
        model(x)
        with torch.no_grad():
            next(model.blocks3.parameters()).mul_(2)  # in place: captured again, with the new values
        torch.testing.assert_close(model(x), _module_path(model, x), rtol=1e-4, atol=1e-4)
        for size in (64, 80, 96, 112, 128):
            model(torch.randn(1, 3, size, size, device="cuda"))
    assert 1 <= len(_graphs(model)) <= 4


@gpu
@pytest.mark.gpu
def test_a_caller_capturing_the_model_itself_gets_no_nested_capture():
    model, x = _fused_s1("cuda", graphs=True), torch.randn(2, 3, 64, 64, device="cuda")
    with torch.inference_mode():
        expected = _module_path(model, x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            model(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = model(x)
        graph.replay()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.gpu
def test_a_function_that_syncs_with_the_host_is_not_captured():
    def fn(t):
        return t * float(t.sum().item())  # reads a value on the host: cannot be captured

    x = torch.randn(8, device="cuda")
    with torch.inference_mode():
        replay, out = CudaGraphReplay.capture(fn, x, [])
    assert replay is None and torch.equal(out, fn(x))


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on the CPU: a function run under capture registers how to recompute its
    output into the same buffer, and replay() does that, as a graph replays its kernels on fixed buffers."""

    capturing = None

    def __init__(self):
        self.kernels = []

    def replay(self):
        with torch.inference_mode():  # kernels write their buffers below autograd's rules, whatever the mode
            for kernel in self.kernels:
                kernel()


class _FakeCapture:
    def __init__(self, graph):
        self.graph = graph

    def __enter__(self):
        _FakeGraph.capturing = self.graph

    def __exit__(self, *exc):
        _FakeGraph.capturing = None


@pytest.fixture
def cpu_graphs(monkeypatch):
    """CudaGraphReplay's own logic on CPU tensors, with torch.cuda's streams and graphs replaced by stand-ins."""
    import contextlib

    from shvit_kernels import replay as replay_module

    class Stream:
        def __init__(self, *args, **kwargs):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(replay_module, "graph_replayable", lambda x: True)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", _FakeCapture)


def _captured_affine(weight, wrong_replay=False):
    """t * weight + 1, registering its recomputation when run under a (fake) capture."""

    def fn(t):
        out = t * weight + 1
        if _FakeGraph.capturing is not None:
            bias = 2.0 if wrong_replay else 1.0
            _FakeGraph.capturing.kernels.append(lambda: torch.add(t * weight, bias, out=out))
        return out

    return fn


def test_replay_copies_the_input_in_and_returns_fresh_outputs(cpu_graphs):
    weight = torch.randn(8)
    fn = _captured_affine(weight)
    x, y = torch.randn(8), torch.randn(8)
    with torch.inference_mode():
        replay, out = CudaGraphReplay.capture(fn, x, [weight])
        assert replay is not None and torch.equal(out, fn(x))
        first, second = replay(x), replay(y)
    assert torch.equal(first, fn(x)) and torch.equal(second, fn(y)), "replay did not read the new input"
    assert first.data_ptr() != second.data_ptr()
    with torch.no_grad():  # the input buffer is a normal tensor: no_grad alone may copy into it
        assert torch.equal(replay(x), first)


def test_a_replay_is_invalid_once_a_constant_changes_or_moves(cpu_graphs):
    weight = torch.randn(8)
    with torch.inference_mode():
        replay, _ = CudaGraphReplay.capture(_captured_affine(weight), torch.randn(8), [weight])
    assert replay.valid()
    with torch.no_grad():
        weight.mul_(2)
    assert not replay.valid()
    weight2 = torch.randn(8)
    with torch.inference_mode():
        replay, _ = CudaGraphReplay.capture(_captured_affine(weight2), torch.randn(8), [weight2])
    weight2.data = torch.randn(8)  # new storage: the graph would read the old one
    assert not replay.valid()


def test_a_capture_that_replays_differently_or_fails_is_not_kept(cpu_graphs):
    weight = torch.randn(8)
    x = torch.randn(8)
    with torch.inference_mode():
        replay, out = CudaGraphReplay.capture(_captured_affine(weight, wrong_replay=True), x, [weight])
        assert replay is None and torch.equal(out, x * weight + 1)

        def unsupported(t):
            if _FakeGraph.capturing is not None:
                raise RuntimeError("operation not permitted when stream is capturing")
            return t + 1

        replay, out = CudaGraphReplay.capture(unsupported, x, [])
        assert replay is None and torch.equal(out, x + 1)


@gpu
@pytest.mark.gpu
def test_the_bench_command_times_the_graphed_model_on_cuda():
    variants = bench.model_variants("shvit_s1", torch.device("cuda"), torch.float32, True)
    graphed = [v for v in variants if v.model.__dict__.get("cuda_graphs")]
    assert [v.name for v in graphed] == ["fused, best backends, CUDA graphs"]
    assert not any(v.model.cuda_graphs for v in variants if v is not graphed[0] and hasattr(v.model, "cuda_graphs"))
