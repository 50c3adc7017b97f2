"""Hostile input (issue 16) for wgan_gp.py, root cause by root cause: one line on stderr naming the flag or file,
exit status 2, the folder holding exactly what it held before. In-process (main(argv)) on tiny flags."""
import importlib
import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch

import common
from conftest import run_torchrun
from test_hostile import _one_line_exit_2, _tree, call_main, folder_bytes

wg = importlib.import_module("wgan_gp")
TINY = ["--batch-size", "16", "--n-critic", "2", "--width", "16", "--latent", "8", "--no-plots"]


def _main(capsys, *argv):
    return call_main(wg, capsys, *argv)


_snapshot = folder_bytes


@pytest.fixture(scope="module")
def run(toy, tmp_path_factory):
    """One tiny 1-epoch training on toy atlas89: its folder, data file and checkpoint."""
    wd = tmp_path_factory.mktemp("wgan_hostile")
    data = toy("atlas89", 128)
    assert wg.main(["--data", data, "--out", str(wd / "run"), "--epochs", "1", *TINY]) == 0
    return wd, data, wd / "run" / "ckpt.pt"


def _check(capsys, tmp_path, argv, *words):
    before = _snapshot(tmp_path)
    _one_line_exit_2(_main(capsys, *argv), *words)
    assert _snapshot(tmp_path) == before                    # nothing written, appended or left behind


@pytest.mark.parametrize("out, words", [("plain/run", ["plain is a file"]), ("x" * 256, ["longer than 255"]),
                                        ("r/" + "y" * 300, ["longer than 255"]),
                                        ("r2", ["ckpt.pt: is a folder"])])
def test_A_out_unusable(run, tmp_path, capsys, monkeypatch, out, words):
    (tmp_path / "plain").write_text("x")
    os.makedirs(tmp_path / "r2" / "ckpt.pt")
    monkeypatch.chdir(tmp_path)
    _check(capsys, tmp_path, ["--data", run[1], "--out", out, "--epochs", "1", *TINY], "--out", *words)


def test_B_generate_out_is_folder_and_C_long_name_works(run, tmp_path, capsys):
    (tmp_path / "x.h5").mkdir()
    gen = ["--generate", "3", "--ckpt", run[2], "--energy", "10:100", "--out"]
    _check(capsys, tmp_path, [*gen, tmp_path / "x.h5"], "x.h5", "folder")
    name = "g" * 247 + ".h5"                                 # C: a valid 250-character name
    assert _main(capsys, *gen, tmp_path / name).returncode == 0
    assert sorted(os.listdir(tmp_path)) == sorted([name, "x.h5"])
    with h5py.File(tmp_path / name) as f:
        assert f["cells"].shape == (3, 89)


@pytest.mark.parametrize("energy", ["1:inf", "nan:5", "1e39:1e39", "0:5"])
def test_D_energy_range(run, tmp_path, capsys, energy):
    _check(capsys, tmp_path, ["--generate", "3", "--ckpt", run[2], "--energy", energy, "--out", tmp_path / "g.h5"],
           "--energy")


def _bad_ckpts(folder, ckpt):
    """Truncated, text, another script's, not a dict: each a file in folder -> name."""
    raw = open(ckpt, "rb").read()
    (folder / "truncated.pt").write_bytes(raw[:len(raw) // 2])
    (folder / "text.pt").write_text("hello, not a checkpoint\n")
    torch.save({"script": "2dgan.py", "model": {}, "epoch": 3}, folder / "other.pt")
    torch.save([1, 2, 3], folder / "list.pt")
    return ["truncated.pt", "text.pt", "other.pt", "list.pt"]


def test_E_generate_from_bad_checkpoint(run, tmp_path, capsys):
    for name in _bad_ckpts(tmp_path, run[2]):
        _check(capsys, tmp_path, ["--generate", "3", "--ckpt", tmp_path / name, "--energy", "10:100",
                                  "--out", tmp_path / "g.h5"], name, "checkpoint")


def test_F_resume_bad_checkpoint_or_changed_flags(run, tmp_path, capsys):
    wd, data, ckpt = run
    folder = tmp_path / "bad"
    folder.mkdir()
    for name in _bad_ckpts(folder, ckpt):                   # truncated, text, another script's, a list
        shutil.copy(folder / name, tmp_path / "ckpt.pt")
        _check(capsys, tmp_path, ["--data", data, "--out", tmp_path, "--resume", "--epochs", "2", *TINY], "ckpt.pt")
    os.remove(tmp_path / "ckpt.pt")
    shutil.copytree(wd / "run", tmp_path / "run")           # with run.json: the flags named
    _check(capsys, tmp_path, ["--data", data, "--out", tmp_path / "run", "--resume", "--epochs", "2", *TINY,
                              "--latent", "9"], "--resume", "latent")
    os.remove(tmp_path / "run" / "run.json")                 # a folder from before run.json: the checkpoint says
    _check(capsys, tmp_path, ["--data", data, "--out", tmp_path / "run", "--resume", "--epochs", "2", "--seeds", "2",
                              *TINY], "ckpt.pt", "seeds")
    _check(capsys, tmp_path, ["--data", data, "--out", tmp_path / "none", "--resume", *TINY], "no checkpoint")
    assert not (tmp_path / "none").exists()


@pytest.mark.parametrize("key, fn, words", [
    ("cells", lambda a: a.astype("S12"), ["'cells' has dtype |S12"]),                       # G
    ("energy", lambda a: np.array([str(v) for v in a], dtype=h5py.string_dtype()), ["'energy' has dtype object"]),
    ("cells", lambda a: a.astype(np.complex64), ["'cells' has dtype complex64"]),           # H
    ("cells", lambda a: np.where(np.arange(89) == 3, 1e39, a.astype(np.float64)), ["'cells'", "float32"]),   # I
    ("energy", lambda a: a.astype(np.float64) * 0 + 1e39, ["'energy'", "float32"]),
    ("cells", lambda a: np.where(np.arange(89) < 2, 3e38, a).astype(np.float32), ["'cells' overflows float32"]),
])
def test_GHI_bad_dtypes_and_overflow(toy, tmp_path, capsys, key, fn, words):
    with h5py.File(toy("atlas89", 128)) as f:
        arrays = {k: f[k][()] for k in f}
    arrays[key] = fn(arrays[key])
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        for k, v in arrays.items():
            f[k] = v
    _check(capsys, tmp_path, ["--data", tmp_path / "bad.h5", "--out", tmp_path / "out", "--epochs", "1", *TINY],
           "bad.h5", *words)


def test_I_diverged_model_not_written(run, tmp_path, capsys):
    """A NaN model is refused: the previous checkpoint stays, no generated showers or metrics are written."""
    wd, data, ckpt = run
    shutil.copytree(wd / "run", tmp_path / "run")
    before = (tmp_path / "run" / "ckpt.pt").read_bytes()
    r = _main(capsys, "--data", data, "--out", tmp_path / "run", "--resume", "--epochs", "2", "--lr", "1e30", *TINY)
    _one_line_exit_2(r, "ckpt.pt", "not finite")
    assert (tmp_path / "run" / "ckpt.pt").read_bytes() == before
    ck = torch.load(ckpt, weights_only=False)
    ck["model"]["generator"]["flat"][0, 0] = float("nan")
    torch.save(ck, tmp_path / "nan.pt")
    _check(capsys, tmp_path, ["--generate", "3", "--ckpt", tmp_path / "nan.pt", "--energy", "10:100",
                              "--out", tmp_path / "g.h5"], "nan.pt", "not finite")


def test_L_another_scripts_run_folder(run, tmp_path, capsys):
    """run.json of another script, or an older folder whose metrics.json names it: refused, never overwritten."""
    common.stamp_run_folder(str(tmp_path / "a"), "2dgan.py", {"width": 0.125})
    (tmp_path / "b").mkdir()
    for f in ("a", "b"):
        (tmp_path / f / "ckpt.pt").write_bytes(b"2dgan checkpoint")
        (tmp_path / f / "metrics.json").write_text(json.dumps({"script": "2dgan.py"}))
    for f in ("a", "b"):
        for resume in ([], ["--resume"]):
            _check(capsys, tmp_path, ["--data", run[1], "--out", tmp_path / f, "--epochs", "1", *resume, *TINY],
                   "--out", "2dgan.py")


def test_M_unique_temporary_names(run, tmp_path, monkeypatch):
    """Every file goes through common.write_atomic (unique temporaries); no fixed '.tmp' name is renamed."""
    renamed, replace = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append((str(a), str(b))), replace(a, b))[1])
    assert wg.main(["--data", run[1], "--out", str(tmp_path / "r"), "--epochs", "1", "--n-critic", "2",
                    "--width", "16", "--latent", "8", "--batch-size", "16"]) == 0
    assert {os.path.basename(b) for _, b in renamed} >= {"ckpt.pt", "generated.h5", "metrics.json", "run.json",
                                                         "training.png"}
    assert all(str(os.getpid()) in os.path.basename(a) and len(os.path.basename(a)) <= 255 for a, _ in renamed)
    assert len({a for a, _ in renamed}) == len(renamed)
    assert not [p for p in _tree(tmp_path) if "tmp" in p]


def test_N_torchrun_bad_input_once(tmp_path):
    r = run_torchrun("wgan_gp.py", "--data", "missing.h5", "--out", "o", *TINY, cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("wgan_gp.py: error: missing.h5: no such file") == 1, r.stderr
    assert "Traceback" not in r.stderr.split("wgan_gp.py: error")[0] and "exitcode  : 2" in r.stderr   # rank 0
    assert os.listdir(tmp_path) == []
