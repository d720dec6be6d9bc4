"""CUDA path: runs only where a GPU is present; skipped cleanly elsewhere."""

import pytest
import torch

from moonbase import VL
from moonbase.data.shapes import render_scene
from moonbase.hub import tiny_random

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_cuda_fp32_matches_cpu_and_bf16_runs():
    image = render_scene(seed=5, n_objects=2, size=(128, 96)).image
    greedy = {"temperature": 0, "max_tokens": 8}
    cpu, gpu = VL(tiny_random(seed=0, device="cpu")), VL(tiny_random(seed=0, device="cuda"))
    assert gpu.model.dtype == torch.bfloat16 and gpu.model.device.type == "cuda"
    gpu32 = VL(tiny_random(seed=0, device="cuda", dtype=torch.float32))
    assert gpu32.point(image, "circle") == pytest.approx(cpu.point(image, "circle"))
    for vl in (gpu, gpu32):
        assert isinstance(vl.caption(image, settings=greedy)["caption"], str)
        assert isinstance(vl.query(image, "what?", reasoning=True, settings=greedy)["answer"], str)
        assert isinstance(vl.detect(image, "circle", settings={"max_objects": 3})["objects"], list)
        seeded = {"temperature": 1.0, "top_p": 0.9, "max_tokens": 8, "seed": 3}
        assert vl.caption(image, settings=seeded) == vl.caption(image, settings=seeded)


def test_engine_on_cuda_matches_the_single_request_path():
    from moonbase.engine.engine import EngineConfig

    from .helpers import check_batch, scenes

    model = tiny_random(seed=0, device="cuda", dtype=torch.float32)
    check_batch(model, scenes(3), EngineConfig(max_batch=32, kv_memory_mb=64))


def test_decode_graphs_replay_and_match_the_single_request_path():
    from moonbase.engine.engine import EngineConfig

    from .helpers import check_adapters, check_batch, scenes

    model = tiny_random(seed=0, device="cuda", dtype=torch.float32)
    engine = check_batch(model, scenes(3), EngineConfig(max_batch=12, kv_memory_mb=64), repeat=2)
    assert engine.runner.graphs.graphs  # decode steps went through captured graphs
    eager = check_batch(model, scenes(3), EngineConfig(max_batch=12, kv_memory_mb=64, cuda_graphs=False))
    assert eager.runner.graphs is None
    check_adapters(model, scenes(3))  # steps with adapters run eagerly, next to graph steps of the base


def test_graphs_under_concurrent_clients_in_fp32_and_bf16():
    """The synthetic eval's pattern: a background engine, 16 client threads, fp32 and bf16. Graph capture
    must succeed here (a failed capture falls back to eager forwards, which this test would not notice)."""
    from moonbase.api import VL
    from moonbase.eval.synthetic import evaluate
    from moonbase.hub import nano

    for dtype in (torch.float32, torch.bfloat16):
        vl = VL(nano(device="cuda", dtype=dtype))
        out = evaluate(vl, seed=1, n_scenes=12, n_captcha=2, n_text=2, progress=False)
        assert out["n_examples"]["images"] == 16
        assert vl.engine.runner.graphs.graphs and not vl.engine.runner.graphs.failed, dtype


def test_a_failed_capture_falls_back_to_eager_forwards(monkeypatch):
    from moonbase.engine import graphs
    from moonbase.engine.engine import EngineConfig

    from .helpers import check_batch, scenes

    def broken(self, *args):
        raise RuntimeError("capture failed")

    monkeypatch.setattr(graphs.Graph, "__init__", broken)
    model = tiny_random(seed=0, device="cuda", dtype=torch.float32)
    engine = check_batch(model, scenes(2), EngineConfig(max_batch=8, kv_memory_mb=64))
    assert engine.runner.graphs.failed and not engine.runner.graphs.graphs


def test_moondream3_on_cuda_matches_the_single_request_path_with_graphs():
    """Moondream 3's grouped experts in bf16 (torch._grouped_mm) under captured decode graphs, and in fp32."""
    from moonbase.engine.engine import EngineConfig

    from .helpers import check_batch, scenes

    model = tiny_random(seed=0, device="cuda", dtype=torch.float32, moondream3=True)
    engine = check_batch(model, scenes(3), EngineConfig(max_batch=12, kv_memory_mb=64), repeat=2)
    assert engine.runner.graphs.graphs
    image = render_scene(seed=5, n_objects=2, size=(128, 96)).image
    bf16 = VL(tiny_random(seed=0, device="cuda", dtype=torch.bfloat16, moondream3=True))
    assert bf16.segment(image, "circle")["segments"][0]["object"] == "circle"
    assert isinstance(bf16.detect(image, "circle", settings={"max_objects": 3})["objects"], list)
