"""Hostile input (issue 16) for adagan.py, root cause by root cause: one line on stderr naming the flag or file,
exit status 2, the folders holding exactly what they held before. One tiny real ensemble (T=1) is trained
in-process and serves as the run folder to resume and the --ckpt to sample from."""
import importlib
import json
import os
import re
import shutil
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

import common
from conftest import run_torchrun
from test_hostile import _one_line_exit_2, call_main, folder_bytes, plant

ada = importlib.import_module("adagan")
TINY = ["--epochs", "1", "--width", "0.05", "--batch-size", "8", "--components", "1",
        "--gan-args=--log-every 1000 --val-min 1", "--device", "cpu"]
# the fixed temporary names of before (two trainings into one --out collided there)
OLD_TMP = ["ensemble.pt.tmp", "metrics.json.tmp", "plots/sampling_fraction.tmp.png", "plots/data_weights.tmp.png",
           "component_0/ckpt.pt.tmp"]


def _ada(capsys, *argv):
    return call_main(ada, capsys, *argv)


_state = folder_bytes


@pytest.fixture(scope="module")
def run(tmp_path_factory, toy):
    """C, K, M at once: the data file's name holds '[' (a literal file, not a glob), the run folder's name is 250
    characters, and a folder sits at each fixed temporary name of before (as if another training wrote there)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hostile_ada")
    data = shutil.copy(toy("lcd", 32), root / "toy[1].h5")
    out = root / ("r" * 250)
    for name in OLD_TMP:
        os.makedirs(out / name)
    rc = ada.main(["--data", str(data), "--out", str(out), *TINY])
    assert rc == 0
    return SimpleNamespace(root=root, data=data, out=out)


def test_bracket_data_long_folder_and_busy_temporaries(run):      # C, K, M
    files = set(_state(run.out))
    for name in ("ensemble.pt", "run.json", "generated.h5", "metrics.json", "log.txt", "component_0/ckpt.pt",
                 "plots/sampling_fraction.png", "plots/shower_shapes.png", "plots/data_weights.png"):
        assert name in files, name
    assert not [f for f in files if "tmp" in f and not any(f.startswith(o) for o in OLD_TMP)], files
    m = json.loads((run.out / "metrics.json").read_text())
    assert m["script"] == "adagan.py" and m["data"].endswith("toy[1].h5") and m["components"] == 1


@pytest.mark.parametrize("argv, words", [
    (["--energy", "1:inf"], ["--energy"]),                 # D: inf passed the range check and overflowed
    (["--energy", "nan:5"], ["--energy"]),
    (["--energy", "1e39:1e39"], ["--energy"]),             # finite in float64, inf in float32
    (["--seed", "-1"], ["--seed"]),                        # numpy's message did not name the flag
    (["--mixdisc-lr", "nan"], ["--mixdisc-lr"]),
    (["--bogus"], ["--bogus"]),                            # argparse's usage block before the message
    (["--gan-args", "--bn-mode 'batch"], ["--gan-args", "quotation"]),    # shlex's ValueError traceback
    (["--gan-args=--bogus"], ["--bogus"]),                # 2dgan.py's parser, one line too
])
def test_bad_flags_one_line(run, tmp_path, capsys, monkeypatch, argv, words):
    monkeypatch.chdir(tmp_path)
    _one_line_exit_2(_ada(capsys, "--data", run.data, "--out", "o", *TINY, *argv), "error:", *words)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("gen, out, make, words", [
    (False, "plain", None, ["--out plain", "is a file"]),  # A: traceback from os.makedirs
    (False, "plain/sub", None, ["plain is a file"]),
    (False, "x" * 256, None, ["--out", "longer than 255"]),
    (False, "a/" + "x" * 300, None, ["longer than 255"]),  # nothing made on the way ("a")
    (False, "rep", "rep/metrics.json/", ["rep/metrics.json", "is a folder"]),   # B: found before training
    (False, "rep", "rep/ensemble.pt/", ["rep/ensemble.pt", "is a folder"]),
    (False, "rep", "rep/plots", ["rep/plots", "is a file"]),
    (True, "plain/g.h5", None, ["plain is a file"]),
    (True, "y" * 256 + ".h5", None, ["longer than 255"]),
    (True, "x.h5", "x.h5/", ["--out x.h5", "is a folder"]),  # B: IsADirectoryError at os.replace
])
def test_out_unusable(run, tmp_path, capsys, monkeypatch, gen, out, make, words):
    plant(tmp_path, make)
    before = _state(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = ["--generate", "4", "--ckpt", run.out] if gen else ["--data", run.data, *TINY]
    _one_line_exit_2(_ada(capsys, *argv, "--out", out), "adagan.py: error:", *words)
    assert _state(tmp_path) == before


def test_generate_long_name_works_and_nan_showers_refused(run, tmp_path, capsys, monkeypatch):
    """C: a valid 250-character file name (the temporary stays short); I: non-finite showers (a diverged
    ensemble, here made NaN) are refused before anything is written."""
    monkeypatch.chdir(tmp_path)
    name = "g" * 247 + ".h5"
    r = _ada(capsys, "--generate", "4", "--ckpt", run.out, "--out", name, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path) == [name]
    with h5py.File(name) as f:
        assert f["ECAL"].shape == (4, 25, 25, 25) and np.isfinite(f["ECAL"][:]).all()
    os.remove(name)
    sample = ada.ensemble_sample
    monkeypatch.setattr(ada, "ensemble_sample", lambda *a: (sample(*a)[0] * np.nan, sample(*a)[1]))
    r = _ada(capsys, "--generate", "4", "--ckpt", run.out, "--out", "g.h5", "--device", "cpu")
    _one_line_exit_2(r, "g.h5", "not finite")
    assert os.listdir(tmp_path) == []


def _truncate(path):
    data = open(path, "rb").read()
    open(path, "wb").write(data[:len(data) // 2])


def _text(path):
    open(path, "w").write("not a checkpoint\n")


def _foreign(path):                                        # another script's checkpoint (2dgan.py's) in its place
    shutil.copy(os.path.join(os.path.dirname(path), "component_0", "ckpt.pt"), path)


@pytest.mark.parametrize("name, spoil, words", [
    ("ensemble.pt", _truncate, ["ensemble.pt", "not a readable adagan"]),
    ("ensemble.pt", _text, ["ensemble.pt", "not a readable adagan"]),
    ("ensemble.pt", _foreign, ["ensemble.pt", "not an adagan.py ensemble"]),
    ("component_0/ckpt.pt", _truncate, ["component_0/ckpt.pt"]),
])
@pytest.mark.parametrize("gen", [False, True])
def test_spoilt_checkpoints(run, tmp_path, capsys, monkeypatch, name, spoil, words, gen):
    """F (--resume) and E (--generate --ckpt): a truncated, text or another script's checkpoint."""
    out = shutil.copytree(run.out, tmp_path / "run")
    spoil(str(out / name))
    before = _state(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv = (["--generate", "4", "--ckpt", "run", "--out", "g.h5"] if gen else
            ["--data", run.data, "--out", "run", *TINY, "--components", "2", "--resume"])
    _one_line_exit_2(_ada(capsys, *argv), "adagan.py: error:", *words)
    assert _state(tmp_path) == before


@pytest.mark.parametrize("argv, words", [
    (["--width", "0.1"], ["--resume", "model flags differ", "width"]),
    (["--gan-args=--latent 100 --log-every 1000 --val-min 1"], ["--resume", "latent"]),
])
def test_resume_with_changed_model_flags(run, capsys, argv, words):       # F: accepted silently before
    before = _state(run.out)
    r = _ada(capsys, "--data", run.data, "--out", run.out, *TINY, "--components", "2", "--resume", *argv)
    _one_line_exit_2(r, "adagan.py: error:", *words)
    assert _state(run.out) == before                      # not even log.txt appended


@pytest.mark.parametrize("stamp, words", [
    ("run.json", ["a run folder of 2dgan.py"]),
    ("metrics.json", ["a run folder of wgan_gp.py"]),      # a folder from before run.json
])
def test_another_scripts_run_folder(run, tmp_path, capsys, stamp, words):      # L: it was overwritten
    other = tmp_path / "other"
    if stamp == "run.json":
        common.stamp_run_folder(str(other), "2dgan.py", {"width": 0.05})
    else:
        other.mkdir()
        (other / "metrics.json").write_text(json.dumps({"script": "wgan_gp.py"}))
    (other / "ckpt.pt").write_bytes(b"weights")
    before = _state(tmp_path)
    for more in ([], ["--resume"]):
        _one_line_exit_2(_ada(capsys, "--data", run.data, "--out", other, *TINY, *more), "adagan.py: error:")
        assert _state(tmp_path) == before


def test_non_finite_state_refused_previous_kept(run, tmp_path, capsys, monkeypatch):
    """I: a component whose showers are not finite (a diverged 2DGAN; here its features are made NaN) is refused
    when the state is saved: exit 2, and ensemble.pt stays the last good state."""
    out = shutil.copytree(run.out, tmp_path / "run")
    feats = ada.features
    monkeypatch.setattr(ada, "features", lambda e, p: {k: v * np.nan for k, v in feats(e, p).items()})
    r = _ada(capsys, "--data", run.data, "--out", out, *TINY, "--components", "2", "--resume", "--mixdisc-epochs", "1",
             "--mixdisc-batch", "16")
    _one_line_exit_2(r, "ensemble.pt", "not finite")
    st = ada.load_state(str(out / "ensemble.pt"))
    assert st["components"] == ["component_0"] and int(st["pending"]["t"]) == 1
    common.check_finite({k: v for k, v in st.items() if k != "args"}, "ensemble.pt")


def test_torchrun_bad_input_once_every_rank_exits_2(run, tmp_path):      # N
    (tmp_path / "plain").write_text("x")
    r = run_torchrun("adagan.py", "--data", run.data, "--out", "plain/run", *TINY, cwd=tmp_path)
    assert r.returncode != 0 and r.stderr.count("adagan.py: error:") == 1, r.stderr[-3000:]
    assert "plain is a file" in r.stderr
    codes = re.findall(r"exitcode\s*:\s*(-?\d+)", r.stderr)     # torchrun ends the ranks still running (-15)
    assert "2" in codes and set(codes) <= {"2", "-15"}, codes
    assert os.listdir(tmp_path) == ["plain"]


@pytest.mark.parametrize("key, fn, words", [
    ("ECAL", lambda a: a.astype("S12"), ["'ECAL' has dtype |S12"]),          # G: a TypeError traceback
    ("target", lambda a: a.astype(str).astype(object), ["'target' has dtype object"]),
    ("ECAL", lambda a: a.astype(np.complex64), ["complex64"]),               # H: accepted with a ComplexWarning
    ("ECAL", lambda a: np.where(a > 0.01, 1e39, a.astype(np.float64)), ["not finite in float32"]),   # I
    ("target", lambda a: a.astype(np.float64) * 0 + 1e39, ["not finite in float32"]),
])
def test_data_in_float32(run, tmp_path, capsys, monkeypatch, key, fn, words):
    with h5py.File(run.data) as f:
        arrays = {k: f[k][:] for k in ("ECAL", "target")}
    arrays[key] = fn(arrays[key])
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v, dtype=h5py.string_dtype() if v.dtype == object else None)
    monkeypatch.chdir(tmp_path)
    _one_line_exit_2(_ada(capsys, "--data", "bad.h5", "--out", "o", *TINY), "adagan.py: error:", "bad.h5", *words)
    assert os.listdir(tmp_path) == ["bad.h5"]


def test_glob_with_one_bad_file(run, tmp_path, capsys, monkeypatch):
    """J: a glob over a good file and a NaN one is refused, naming the bad file, before any run folder exists."""
    shutil.copy(run.data, tmp_path / "d1.h5")
    shutil.copy(run.data, tmp_path / "d2.h5")
    with h5py.File(tmp_path / "d2.h5", "r+") as f:
        f["ECAL"][0, 0, 0, 0] = np.nan
    monkeypatch.chdir(tmp_path)
    _one_line_exit_2(_ada(capsys, "--data", "d*.h5", "--out", "o", *TINY), "adagan.py: error:", "d2.h5")
    assert sorted(os.listdir(tmp_path)) == ["d1.h5", "d2.h5"]
