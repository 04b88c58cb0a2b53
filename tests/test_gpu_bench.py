"""experiments/gpu_bench.py on CPU with --tiny: every side of every section runs and prints its ratio lines."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "experiments" / "gpu_bench.py"


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_tiny_on_cpu(capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert _bench().main(["--device", "cpu", "--tiny", "--sections", "resnet", "vit"]) == 0
    out = capsys.readouterr().out
    for line in ("ratio cltoolbox/hand resnet18_reduced naive b32 32",
                 "ratio cltoolbox/hand resnet18_reduced er b32 bf16",
                 "ratio avalanche/cltoolbox resnet18_reduced er b32 32", "ratio bf16/fp32 cltoolbox",
                 "ratio uncached/cached vit l2p 32", "ratio uncached/cached vit simplecil 32"):
        assert line in out, out
    table = out[out.index("| gpu_bench on"):].splitlines()
    assert table[1] == "|---|---|" and any(r.startswith("| ratio cltoolbox/hand") for r in table)


@pytest.mark.slow
def test_gpu_bench_ddp_section_on_cpu(capsys, monkeypatch):
    """The DDP section: `cltoolbox run --nproc 2` (gloo) beside one process (~30 s: process starts)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert _bench().main(["--device", "cpu", "--tiny", "--sections", "ddp"]) == 0
    assert "ratio ddp train_s 1 process / 2 processes" in capsys.readouterr().out


def test_gpu_bench_refuses_cuda_without_a_gpu(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert _bench().main(["--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err
