"""Hostile input for 2dgan.py (issue 16), root cause by root cause: one line on stderr naming the flag or file, exit
status 2, the folder holding exactly what it held before; a valid 250-character name and a path holding '[' work.
In-process (main(argv) with capsys): one tiny training, shared by the cases that need a run folder or checkpoint;
one torchrun run (N)."""
import importlib
import json
import os
import shutil
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch

import common
from conftest import REPO, run_torchrun
from test_2dgan import one_thread  # noqa: F401  (autouse: model code on one thread)
from test_hostile import _one_line_exit_2, call_main, plant

m = importlib.import_module("2dgan")
TINY = ["--width", "0.125", "--batch-size", "8", "--val-frac", "0.25", "--epochs", "1", "--seed", "3"]


def _main(capsys, *argv):
    return call_main(m, capsys, *argv)


def _tree(root):
    """Every path under root with its size and modification time: 'nothing written or appended'."""
    out = {}
    for d, ds, fs in os.walk(root):
        for n in ds + fs:
            st = os.stat(os.path.join(d, n))
            out[os.path.relpath(os.path.join(d, n), root)] = (st.st_size, st.st_mtime_ns) if n in fs else None
    return out


def _refused(capsys, root, *argv, words=()):
    before = _tree(root)
    _one_line_exit_2(_main(capsys, *argv), "2dgan.py: error:", *words)
    assert _tree(root) == before


def _lcd(path, x=None, ep=None, n=16):
    x = np.zeros((n, 25, 25, 25), np.float32) if x is None else x
    x[:, 12, 12, 5] += 1.0
    with h5py.File(path, "w") as f:
        f["ECAL"] = x
        f["target"] = np.c_[np.full(n, 11.0), np.linspace(10, 400, n) if ep is None else ep]
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory, toy):
    """One tiny training on data named 'lcd[1].h5' (K) into a 250-character folder (C), every file written
    under a temporary name unique per write (M)."""
    base = tmp_path_factory.mktemp("h2d")
    data = shutil.copy(toy("lcd", 16, 0), base / "lcd[1].h5")
    out = base / ("d" * 250)
    names, tmp_name = [], common.tmp_name
    common.tmp_name = lambda path, suffix="": names.append((path, tmp_name(path, suffix))) or names[-1][1]
    try:
        assert m.main(["--data", str(data), "--out", str(out), *TINY]) == 0
    finally:
        common.tmp_name = tmp_name
    return SimpleNamespace(base=base, data=str(data), out=out, ckpt=out / "ckpt.pt", tmp_names=names)


def test_bracket_path_long_folder_unique_temporaries(run):          # K, C, M
    assert sorted(_tree(run.out)) == ["ckpt.pt", "generated.h5", "log.txt", "metrics.json", "plots",
                                      "plots/profiles.png", "plots/sampling_fraction.png", "run.json"]
    assert json.loads((run.out / "metrics.json").read_text())["data"].endswith("lcd[1].h5")
    assert sorted(os.path.basename(path) for path, _ in run.tmp_names) == [
        "ckpt.pt", "generated.h5", "log.txt", "metrics.json", "profiles.png", "run.json", "sampling_fraction.png"]
    tmps = {t for _, t in run.tmp_names}
    assert len(tmps) == 7 and all(len(os.path.basename(t)) <= 255 for t in tmps)


@pytest.mark.parametrize("out, make, words", [
    ("plain/run", None, ["plain is a file, not a folder"]),              # A: traceback from os.makedirs
    ("n" * 256, None, ["longer than 255"]),
    ("a/" + "x" * 300, None, ["longer than 255"]),
    ("r", "r/metrics.json/", ["r/metrics.json: is a folder"]),           # B, found before any training
    ("r", "r/ckpt.pt/", ["r/ckpt.pt: is a folder"]),
    ("r", "r/plots", ["plots is a file, not a folder"]),
])
def test_out_unusable(toy, tmp_path, capsys, monkeypatch, out, make, words):
    plant(tmp_path, make)
    monkeypatch.chdir(tmp_path)
    _refused(capsys, tmp_path, "--data", toy("lcd", 16, 0), "--out", out, *TINY, words=words)


@pytest.mark.parametrize("out, words", [("g.h5", ["--out g.h5: is a folder"]),               # B
                                        ("plain/g.h5", ["plain is a file"]), ("g" * 256 + ".h5", ["255"])])   # A
def test_generate_out_unusable(run, tmp_path, capsys, monkeypatch, out, words):
    (tmp_path / "g.h5").mkdir()
    (tmp_path / "plain").write_text("x")
    monkeypatch.chdir(tmp_path)
    _refused(capsys, tmp_path, "--generate", "3", "--ckpt", run.ckpt, "--out", out, words=words)


def test_generate_long_valid_name_works(run, tmp_path, capsys):       # C: path + ".tmp<pid>" passed 255
    name = "s" * 247 + ".h5"
    assert _main(capsys, "--generate", "3", "--ckpt", run.ckpt, "--out", tmp_path / name).returncode == 0
    assert os.listdir(tmp_path) == [name]
    assert m.load_lcd(str(tmp_path / name))[0].shape == (3, 25, 25, 25)


@pytest.mark.parametrize("energy", ["1:inf", "nan:5", "1e30:1e30", "5:1", "x"])
def test_energy_range(tmp_path, capsys, energy):                     # D: inf passed the check and overflowed
    _refused(capsys, tmp_path, "--generate", "3", "--ckpt", tmp_path / "c.pt", "--energy", energy,
             "--out", tmp_path / "g.h5", words=["--energy"])


@pytest.mark.parametrize("flags, word", [(["--width", "nan"], "--width"), (["--lr-g", "-1"], "--lr-g"),
                                         (["--seed", "-1"], "--seed"), (["--bogus"], "--bogus")])
def test_bad_flags_one_line(tmp_path, capsys, flags, word):          # argparse printed its usage block first
    _refused(capsys, tmp_path, "--out", tmp_path / "o", *flags, words=[word])


def _bad_ckpts(run, folder):
    """(name, make(path)) of checkpoints that are not this run's: truncated, text, another script's."""
    return {"truncated": lambda p: p.write_bytes(run.ckpt.read_bytes()[:5000]),
            "text": lambda p: p.write_text("not a checkpoint"),
            "other": lambda p: torch.save({"G": {"w": torch.zeros(2)}, "epoch": 1}, p),
            "other_script": lambda p: torch.save({**torch.load(run.ckpt, weights_only=False), "script": "vaegan.py"}, p)}


@pytest.mark.parametrize("case", ["truncated", "text", "other", "other_script"])
def test_generate_bad_checkpoint(run, tmp_path, capsys, case):      # E
    _bad_ckpts(run, tmp_path)[case](tmp_path / "c.pt")
    _refused(capsys, tmp_path, "--generate", "3", "--ckpt", tmp_path / "c.pt", "--out", tmp_path / "g.h5",
             words=["c.pt", "vaegan.py" if case == "other_script" else "not a 2dgan.py checkpoint"])


@pytest.mark.parametrize("case, flags, words", [
    ("truncated", [], ["ckpt.pt: not a 2dgan.py checkpoint"]),         # F: tracebacks at torch.load
    ("text", [], ["ckpt.pt: not a 2dgan.py checkpoint"]),
    ("other", [], ["ckpt.pt: not a 2dgan.py checkpoint"]),
    ("other_script", [], ["a checkpoint of vaegan.py"]),
    ("stamped", ["--width", "0.25"], ["model flags differ", "width"]),  # run.json records the model flags
    ("legacy", ["--xscale", "10"], ["model flags differ", "--xscale"]),  # a folder from before run.json: the ckpt's
    ("legacy", ["--latent", "16"], ["--latent"]),
])
def test_resume_refused(run, tmp_path, capsys, case, flags, words):
    out = tmp_path / "r"
    shutil.copytree(run.out, out)
    if case in _bad_ckpts(run, tmp_path):
        _bad_ckpts(run, tmp_path)[case](out / "ckpt.pt")
    if case == "legacy":
        os.remove(out / "run.json")
    _refused(capsys, tmp_path, "--data", run.data, "--out", out, "--resume", *TINY, "--epochs", "2", *flags,
             words=words)


@pytest.mark.parametrize("stamp, words", [
    ({"run.json": {"script": "wgan_gp.py", "model": {}}}, ["a run folder of wgan_gp.py"]),      # L
    ({"metrics.json": {"script": "vaegan.py"}}, ["a run folder of vaegan.py"]),                 # before run.json
])
@pytest.mark.parametrize("resume", [False, True])
def test_another_scripts_run_folder(toy, tmp_path, capsys, stamp, words, resume):
    out = tmp_path / "r"
    out.mkdir()
    for name, obj in stamp.items():
        (out / name).write_text(json.dumps(obj))
    (out / "ckpt.pt").write_text("theirs")
    _refused(capsys, tmp_path, "--data", toy("lcd", 16, 0), "--out", out, *TINY, *(["--resume"] if resume else []),
             words=words)


def _distort(x, t, case):
    if case == "ecal_str":
        return x.astype("S8"), t
    if case == "target_str":
        return x, np.array([str(v) for v in t.ravel()], dtype=h5py.string_dtype()).reshape(t.shape)
    if case == "complex":
        return x.astype(np.complex64), t
    if case == "1e39":                                                  # finite in float64, inf in float32
        x = x.astype(np.float64)
        x[2, 3, 4, 5] = 1e39
        return x, t
    t = t.astype(np.float64)
    t[1, 1] = 1e39
    return x, t


@pytest.mark.parametrize("case, words", [("ecal_str", ["'ECAL' has dtype |S8"]),      # G: TypeError traceback
                                         ("target_str", ["'target' has dtype object"]),
                                         ("complex", ["complex64"]),                  # H: a ComplexWarning, accepted
                                         ("1e39", ["'ECAL'", "float32"]),             # I: passed the float64 check
                                         ("ep_1e39", ["'target'", "float32"])])
def test_bad_dtypes_and_float32_overflow(tmp_path, capsys, case, words):
    x = np.zeros((16, 25, 25, 25), np.float32)
    x[:, 12, 12, 5] = 1.0
    t = np.c_[np.full(16, 11.0), np.linspace(10, 400, 16)]
    x, t = _distort(x, t, case)
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f["ECAL"], f["target"] = x, t
    _refused(capsys, tmp_path, "--data", tmp_path / "bad.h5", "--out", tmp_path / "o", *TINY, words=["bad.h5", *words])


def test_non_finite_model_is_not_written(run, tmp_path, capsys, monkeypatch):
    """I: a model that turns NaN (here: the generator step made to write NaN) is refused before ckpt.pt,
    generated.h5 or metrics.json: a resumed run keeps its checkpoint as it was, a new one leaves no folder."""
    step = m.Steps.__call__

    def poisoned(self, real, e, epoch):
        out = step(self, real, e, epoch)
        with torch.no_grad():
            next(self.G.parameters()).fill_(float("nan"))
        return out
    monkeypatch.setattr(m.Steps, "__call__", poisoned)
    shutil.copytree(run.out, tmp_path / "r")
    _refused(capsys, tmp_path, "--data", run.data, "--out", tmp_path / "r", "--resume", *TINY, "--epochs", "2",
             words=["ckpt.pt: not finite", "previous file is kept"])
    before = _tree(tmp_path)
    _one_line_exit_2(_main(capsys, "--data", run.data, "--out", tmp_path / "new", *TINY), "not finite")
    assert _tree(tmp_path) == before


def test_streamed_glob_with_one_nan_file(tmp_path, capsys):         # J: exit 2 but an empty run folder left
    _lcd(tmp_path / "EleEscan_0.h5")
    x = np.zeros((16, 25, 25, 25), np.float32)
    x[7, 1, 2, 3] = np.nan
    _lcd(tmp_path / "EleEscan_1.h5", x)
    _refused(capsys, tmp_path, "--data", tmp_path / "EleEscan_*.h5", "--max-data-gb", "1e-6", "--out", tmp_path / "s",
             *TINY, words=["EleEscan_1.h5", "not finite"])


def test_torchrun_ranks_fail_alike(tmp_path, capsys, monkeypatch):
    """N: every rank validates before joining the process group (no hang), exits 2, and rank 0 alone prints."""
    bad = _lcd(tmp_path / "bad.h5", ep=np.r_[np.zeros(1), np.full(15, 50.0)])
    waits = []                                                          # ranks > 0 let rank 0 print first
    monkeypatch.setattr(m.time, "sleep", waits.append)
    for rank, lines in (("1", 0), ("0", 1)):
        monkeypatch.setenv("RANK", rank)
        monkeypatch.setenv("WORLD_SIZE", "2")
        r = _main(capsys, "--data", bad, "--out", tmp_path / "o", *TINY)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == lines and "Traceback" not in r.stderr
    assert "bad.h5: primary energy" in r.stderr and os.listdir(tmp_path) == ["bad.h5"]
    for rank, err in (("1", ""), ("0", "2dgan.py: error: --epochs must be >= 1\n")):    # a bad flag alike
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as e:
            m.get_args(["--epochs", "0"])
        assert e.value.code == 2 and capsys.readouterr().err == err
    assert waits == [3, 3]


def test_torchrun_one_line_no_hang(tmp_path):
    """N as a user meets it: 2 ranks, a bad flag; one error line (rank 0's), a rank that exited 2, no traceback of
    2dgan.py; torchrun stops the other rank and adds its own report."""
    r = run_torchrun("2dgan.py", "--epochs", "0", "--out", "o", cwd=tmp_path, timeout=120)
    assert r.returncode != 0 and r.stderr.count("2dgan.py: error: --epochs must be >= 1") == 1, r.stderr[-2000:]
    assert "exitcode  : 2" in r.stderr and 'File "' + str(REPO / "2dgan.py") not in r.stderr
    assert os.listdir(tmp_path) == []
