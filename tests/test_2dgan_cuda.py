"""GPU paths of 2dgan.py (skipped without CUDA): one training epoch in fp32 and bf16, eager and torch.compile,
then sampling from the checkpoint; and --benchmark. One command on a GPU machine:
    python -m pytest -q tests/test_2dgan_cuda.py"""
import importlib
import json

import h5py
import numpy as np
import pytest
import torch

m = importlib.import_module("2dgan")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
SMALL = ["--device", "cuda", "--width", "0.25", "--batch-size", "32", "--epochs", "1", "--log-every", "2"]


@pytest.mark.parametrize("compile_", [False, True], ids=["eager", "compile"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_one_epoch_on_cuda(toy, tmp_path, dtype, compile_):
    out = tmp_path / "run"
    flags = ["--data", toy("lcd", 256, 0), "--out", str(out), "--dtype", dtype] + SMALL + (["--compile"] if compile_ else [])
    assert m.main(flags) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 1 and np.isfinite(metrics["history"][0]["loss_g"])
    with h5py.File(out / "generated.h5") as f:
        x = f["ECAL"][:]
    assert np.isfinite(x).all() and (x >= 0).all()
    G, ck = m.load_checkpoint(str(out / "ckpt.pt"), "cuda")
    assert next(G.parameters()).is_cuda and ck["args"]["dtype"] == dtype
    assert m.main(["--generate", "64", "--ckpt", str(out / "ckpt.pt"), "--device", "cuda", "--dtype", dtype,
                   "--out", str(tmp_path / "gen.h5")]) == 0


@pytest.mark.parametrize("flags", [["--dtype", "fp32"], ["--dtype", "bf16", "--compile"]], ids=["fp32", "bf16-compile"])
def test_benchmark_on_cuda(capsys, flags):
    assert m.main(["--benchmark", "--device", "cuda", "--gen-batch", "1024", "--batch-size", "64", *flags]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["device"] != "cpu" and out["gen_showers_per_s"] > 0 and out["train_samples_per_s"] > 0
    assert out["dtype"] == flags[1] and out["compile"] == ("--compile" in flags)
