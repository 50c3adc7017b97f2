"""Hostile input (issue 16), root cause by root cause: one line on stderr naming the flag or file, exit
status 2, nothing left behind. This file covers `common.py toy`, evaluate.py, common.py's safe-file helpers
and one-line flag errors everywhere; each model script's cases are in tests/test_hostile_<script>.py."""
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import h5py
import numpy as np
import pytest

import common
from conftest import REPO, run_script
from test_evaluate import distort


def _one_line_exit_2(r, *words):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.mark.parametrize("flags, word", [
    (["--energy", "1:inf"], "--energy"),            # D: inf passed the range check and overflowed
    (["--energy", "1e30:1e30"], "--energy"),        # overflow of the spot counts, flag not named
    (["--energy", "nan:5"], "--energy"),
    (["--seed", "-1"], "--seed"),                   # numpy's message did not name the flag
    (["--bogus"], "--bogus"),                       # argparse's whole usage block before the message
])
def test_toy_bad_flags_one_line(tmp_path, flags, word):
    out = tmp_path / "t.h5"
    r = run_script("common.py", "toy", "atlas89", "-n", "4", "-o", out, *flags, cwd=tmp_path)
    _one_line_exit_2(r, word)
    assert os.listdir(tmp_path) == []


def test_toy_out_is_a_folder(tmp_path):                # B: IsADirectoryError at os.replace
    (tmp_path / "x.h5").mkdir()
    r = run_script("common.py", "toy", "atlas89", "-n", "4", "-o", "x.h5", cwd=tmp_path)
    _one_line_exit_2(r, "x.h5", "folder")
    assert os.listdir(tmp_path) == ["x.h5"] and os.listdir(tmp_path / "x.h5") == []


def test_toy_name_too_long(tmp_path):                  # A: refused before any shower is made
    r = run_script("common.py", "toy", "atlas89", "-n", "4", "-o", "n" * 256 + ".h5", cwd=tmp_path)
    _one_line_exit_2(r, "255")
    assert os.listdir(tmp_path) == []


def test_toy_long_valid_name_works(tmp_path):          # C: path + ".tmp<pid>" passed 255 characters
    name = "s" * 247 + ".h5"                            # 250 characters: a valid file name
    r = run_script("common.py", "toy", "atlas89", "-n", "4", "-o", name, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path) == [name]
    with h5py.File(tmp_path / name) as f:
        assert f["cells"].shape == (4, 89) and np.isfinite(f["cells"][:]).all()


def test_tmp_name_short_and_unique(tmp_path):
    path = str(tmp_path / ("a" * 250))
    names = {common.tmp_name(path) for _ in range(50)}
    assert len(names) == 50
    assert all(len(os.path.basename(t)) <= 255 and os.path.dirname(t) == str(tmp_path) for t in names)
    assert common.tmp_name(str(tmp_path / "b.npz"), ".npz").endswith(".npz")


# ------------------------------------------------------------------ evaluate.py

def call_main(module, capsys, *argv):
    """module.main(argv) in-process (spares a subprocess's torch import), answered like run_script; every
    tests/test_hostile_<script>.py calls its script through this."""
    try:
        rc = module.main([*map(str, argv)])
    except SystemExit as e:                        # argparse
        rc = e.code
    return SimpleNamespace(returncode=rc, stderr=capsys.readouterr().err)


def folder_bytes(root):
    """Every file and folder under root with each file's bytes (None for a folder): what "nothing written,
    appended or left behind" is checked against."""
    return {os.path.relpath(os.path.join(d, n), root): None if n in ds else open(os.path.join(d, n), "rb").read()
            for d, ds, fs in os.walk(root) for n in ds + fs}


def plant(root, make=None):
    """The obstacles of an out-path case: a file 'plain' and, if given, make (a folder if it ends with '/', else a
    file) with its parent folders."""
    (root / "plain").write_text("x")
    if make:
        os.makedirs(root / os.path.dirname(make.rstrip("/")), exist_ok=True)
        os.makedirs(root / make) if make.endswith("/") else (root / make).write_text("x")


def _evaluate(capsys, *argv):
    import evaluate
    return call_main(evaluate, capsys, *argv)


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs)


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("flags, word", [
    (["--bogus"], "--bogus"),                       # argparse's whole usage block before the message
    (["--bins", "x"], "--bins"),
    (["--max-events", "0"], "--max-events"),
])
def test_evaluate_bad_flags_one_line(toy, tmp_path, capsys, flags, word):
    real = toy("atlas89", 20)
    _one_line_exit_2(_evaluate(capsys, real, real, "--out", tmp_path / "rep", *flags), "evaluate.py: error:", word)
    assert os.listdir(tmp_path) == []


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("out, make, words", [
    ("plain", None, ["plain is a file, not a folder"]),                    # A: traceback from os.makedirs
    ("plain/sub", None, ["plain is a file, not a folder"]),
    ("x" * 256, None, ["x" * 256, "longer than 255"]),
    ("a/" + "x" * 300, None, ["longer than 255"]),                          # nothing made on the way ("a")
    ("rep", "rep/metrics.json/", ["rep/metrics.json: is a folder"]),        # B: IsADirectoryError at os.replace
    ("rep", "rep/report.md/", ["rep/report.md: is a folder"]),
    ("rep", "rep/plots", ["rep/plots: is a file"]),
    ("rep", "rep/plots/hist_energy_and_hits.png/", ["hist_energy_and_hits.png: is a folder"]),  # found at plot time
])
def test_evaluate_out_unusable(toy, tmp_path, capsys, monkeypatch, out, make, words):
    real = toy("atlas89", 20)
    plant(tmp_path, make)
    before = _tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    _one_line_exit_2(_evaluate(capsys, real, real, "--out", out, "--no-classifier"), *words)
    assert _tree(tmp_path) == before             # nothing written, no temporary left


def test_evaluate_long_out_and_bracket_path_work(toy, tmp_path, capsys):
    """C: a valid 250-character folder name (temporaries stay short); K: an existing path with '[' is a file,
    not a glob (the glob 'real[1].h5' would match only 'real1.h5', which does not exist)."""
    real = shutil.copy(toy("atlas89", 20), tmp_path / "real[1].h5")
    out = tmp_path / ("d" * 250)
    r = _evaluate(capsys, real, real, "--out", out, "--no-classifier", "--no-plots")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(out)) == ["metrics.json", "report.md"]
    assert json.loads((out / "metrics.json").read_text())["real"]["path"].endswith("real[1].h5")


@pytest.mark.parametrize("kind, key, fn, words", [
    ("atlas89", "cells", lambda a: a.astype("S12"), ["'cells' has dtype |S12"]),          # G: TypeError traceback
    ("atlas89", "energy", lambda a: np.array([str(v) for v in a], dtype=h5py.string_dtype()),
     ["'energy' has dtype object"]),
    ("atlas89", "cells", lambda a: a.astype(np.complex64), ["complex64"]),                # H: ComplexWarning, accepted
    ("atlas89", "cells", lambda a: np.where(np.arange(89) == 3, 1e39, a.astype(np.float64)),
     ["'cells' has NaN or inf values in float32"]),                                       # I: 1e39 passed float64
    ("atlas89", "energy", lambda a: a.astype(np.float64) * 0 + 1e39, ["incident energy", "float32"]),
    ("atlas89", "energy", lambda a: a.astype(np.float64) * 0 + 1e-40, ["voxels / incident energy overflow float32"]),
    ("calochallenge1", "showers", lambda a: np.where(np.arange(368) < 2, 3e38, a).astype(np.float32),
     ["observable Etot_Einc overflows float32"]),                                         # I: finite, sums overflow
])
def test_evaluate_bad_dtypes_and_overflow(toy, tmp_path, kind, key, fn, words):
    real = toy(kind, 20)
    distort(real, tmp_path / "bad.h5", key, fn)
    r = run_script("evaluate.py", real, "bad.h5", "--out", "rep", "--no-plots", "--cls-epochs", "1",
                   "--cls-hidden", "8", cwd=tmp_path)
    _one_line_exit_2(r, "bad.h5", *words)
    assert os.listdir(tmp_path) == ["bad.h5"]


@pytest.mark.filterwarnings("error")
def test_evaluate_non_finite_metric_refused(toy, tmp_path, capsys, monkeypatch):
    """I: a non-finite yardstick is refused before anything is written (max(0, NaN) hid a NaN Frechet distance)."""
    import evaluate
    monkeypatch.setattr(evaluate.common, "frechet_distance", lambda a, b: float("nan"))
    real = toy("atlas89", 20)
    _one_line_exit_2(_evaluate(capsys, real, real, "--out", tmp_path / "rep", "--no-classifier"),
                     "non-finite", "Frechet distance", "nothing written")
    assert os.listdir(tmp_path) == []


def test_evaluate_write_atomic_leaves_nothing(tmp_path):
    """B/C: a write that fails half-way leaves neither the file nor its temporary; the error is one line."""
    import evaluate

    def half(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(evaluate.DataError, match="m.json: cannot write .No space left on device"):
        common.write_atomic(str(tmp_path / "m.json"), half)   # evaluate.py writes through common's
    assert os.listdir(tmp_path) == []


def test_evaluate_two_runs_one_out(toy, tmp_path):
    """M: two evaluations into one --out at once; each writes its plots and metrics under unique temporaries."""
    real = toy("ild", 20)
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    cmd = [sys.executable, str(REPO / "evaluate.py"), real, real, "--out", "rep", "--no-classifier"]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()
        p.stderr.close()
    files = _tree(tmp_path / "rep")
    assert "metrics.json" in files and len([f for f in files if f.endswith(".png")]) >= 3
    assert not [f for f in files if "tmp" in f], files
    assert json.loads((tmp_path / "rep" / "metrics.json").read_text())["detector"] == "ild"


# ---------------------------------------------------------------- the shared helpers in common.py


def test_check_out_path_refuses_without_creating(tmp_path):   # A, before anything is made
    (tmp_path / "f").write_text("x")
    for bad, word in [(tmp_path / "f" / "run", "is a file"), (tmp_path / ("n" * 256), "255"),
                      (tmp_path / "f", "not a folder")]:
        with pytest.raises(common.InputError, match=word):
            common.check_out_path(str(bad))
    (tmp_path / "d.h5").mkdir()
    with pytest.raises(common.InputError, match="folder"):
        common.check_out_path(str(tmp_path / "d.h5"), "--out", folder=False)
    common.check_out_path(str(tmp_path / "new" / "deeper"))
    assert sorted(os.listdir(tmp_path)) == ["d.h5", "f"]


def test_write_atomic_keeps_extension_and_leaves_nothing(tmp_path):   # B, C, M
    seen = []
    common.write_atomic(str(tmp_path / ("s" * 246 + ".png")), lambda t: (seen.append(t), open(t, "w").write("x")))
    assert seen[0].endswith(".png") and len(os.path.basename(seen[0])) <= 255
    assert os.listdir(tmp_path) == ["s" * 246 + ".png"]
    (tmp_path / "x.json").mkdir()
    with pytest.raises(common.InputError, match="folder"):
        common.write_atomic(str(tmp_path / "x.json"), "{}")

    def boom(t):
        open(t, "w").write("half")
        raise OSError(28, "No space left on device")
    with pytest.raises(common.InputError, match="No space"):
        common.write_atomic(str(tmp_path / "y.json"), boom)
    assert sorted(os.listdir(tmp_path)) == ["s" * 246 + ".png", "x.json"]


def test_check_real_and_check_finite():                # G, H, I
    assert common.check_real("f", "k", np.array([1, 2], np.int16)).dtype == np.float32
    for bad, word in [(np.array(["1.0"]), "dtype"), (np.array([1 + 1j]), "dtype"), (np.array([1e39]), "finite"),
                      (np.array([np.nan]), "finite")]:
        with pytest.raises(common.InputError, match=word):
            common.check_real("f.h5", "ECAL", bad)
    common.check_finite({"a": [np.ones(3), 2.0, {"b": np.zeros(2, np.float32)}], "n": 3, "s": "x"}, "ckpt")
    import torch
    for bad in [{"w": torch.tensor([1.0, float("inf")])}, [np.array([np.nan])], {"x": float("nan")}]:
        with pytest.raises(common.InputError, match="not finite"):
            common.check_finite(bad, "ckpt.pt")


@pytest.mark.parametrize("text, ok", [("1:500", True), ("2:2", True), ("1:inf", False), ("nan:5", False),
                                      ("0:5", False), ("5:1", False), ("1e39:1e39", False), ("a:b", False),
                                      ("5", False)])
def test_parse_range(text, ok):                        # D
    if ok:
        lo, hi = common.parse_range(text)
        assert (lo, hi) == tuple(float(v) for v in text.split(":"))
    else:
        with pytest.raises(common.InputError, match="--energy"):
            common.parse_range(text)


def test_input_files_literal_brackets(tmp_path):       # K
    f = tmp_path / "run[1].h5"
    f.write_text("")
    assert common.input_files(str(f)) == [str(f)]
    (tmp_path / "a1.h5").write_text("")
    assert common.input_files(str(tmp_path / "a[0-9].h5")) == [str(tmp_path / "a1.h5")]
    with pytest.raises(common.InputError, match="no file matches"):
        common.input_files(str(tmp_path / "z*.h5"))


def test_run_folder_stamp(tmp_path):                   # L and F: another script's folder, changed model flags
    out = str(tmp_path / "run")
    common.check_run_folder(out, "wgan_gp.py")            # a new folder is fine
    common.stamp_run_folder(out, "2dgan.py", {"width": 0.125, "layers": [8, 8]})
    common.check_run_folder(out, "2dgan.py", {"width": 0.125, "layers": [8, 8]}, resume=True)
    with pytest.raises(common.InputError, match="a run folder of 2dgan.py"):
        common.check_run_folder(out, "wgan_gp.py")
    with pytest.raises(common.InputError, match="width"):
        common.check_run_folder(out, "2dgan.py", {"width": 0.25, "layers": [8, 8]}, resume=True)
    common.check_run_folder(out, "2dgan.py", {"width": 0.25, "layers": [8, 8]}, resume=False)   # a fresh run
    legacy = tmp_path / "old"
    legacy.mkdir()
    (legacy / "metrics.json").write_text(json.dumps({"script": "vaegan.py"}))
    with pytest.raises(common.InputError, match="vaegan.py"):
        common.check_run_folder(str(legacy), "sagan_aux.py")


def test_fail_prints_once_under_torchrun(monkeypatch, capsys):   # N
    monkeypatch.setenv("RANK", "1")
    assert common.fail("x.py", common.InputError("bad\nsecond line")) == 2
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    assert common.fail("x.py", common.InputError("bad\nsecond line")) == 2
    assert capsys.readouterr().err == "x.py: error: bad\n"


@pytest.mark.parametrize("script", ["2dgan", "adagan", "wgan_gp", "sagan_aux", "vaegan", "evaluate", "common"])
def test_unknown_flag_one_line_same_prefix(script, capsys):   # the "smaller" case: usage block, mixed prefixes
    import importlib
    mod = importlib.import_module(script)
    argv = {"common": ["toy", "lcd", "-n", "2", "-o", "x.h5"], "evaluate": ["a.h5", "b.h5"]}.get(script, []) + ["--bogus"]
    try:
        rc = mod.main(argv)
    except SystemExit as e:
        rc = e.code
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and ": error: " in err[0] and "--bogus" in err[0], (rc, err)
