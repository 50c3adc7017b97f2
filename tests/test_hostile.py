"""Hostile input (issue 16), root cause by root cause: one line on stderr naming the flag or file, exit
status 2, nothing left behind. This file covers `common.py toy`; the model scripts' cases join it as
their fixes land."""
import os

import h5py
import numpy as np
import pytest

from conftest import run_script


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


def test_toy_long_valid_name_works(tmp_path):          # C: path + ".tmp<pid>" passed 255 characters
    name = "s" * 247 + ".h5"                            # 250 characters: a valid file name
    r = run_script("common.py", "toy", "atlas89", "-n", "4", "-o", name, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path) == [name]
    with h5py.File(tmp_path / name) as f:
        assert f["cells"].shape == (4, 89) and np.isfinite(f["cells"][:]).all()


def test_tmp_name_short_and_unique(tmp_path):
    import common
    path = str(tmp_path / ("a" * 250))
    names = {common.tmp_name(path) for _ in range(50)}
    assert len(names) == 50
    assert all(len(os.path.basename(t)) <= 255 and os.path.dirname(t) == str(tmp_path) for t in names)
    assert common.tmp_name(str(tmp_path / "b.npz"), ".npz").endswith(".npz")
