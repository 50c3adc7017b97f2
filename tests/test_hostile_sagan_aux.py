"""Hostile input for sagan_aux.py (issue 16), one test per root cause that reaches it: one line on stderr
naming the flag or file, exit status 2, and the folder holds exactly what it held before (nothing written,
appended or left behind). In-process through main() wherever a subprocess is not the point."""
import importlib
import inspect
import os
import shutil
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import run_torchrun
from test_hostile import _one_line_exit_2, call_main, folder_bytes, plant

S = importlib.import_module("sagan_aux")
TINY = ["--toy-n", "64", "--batch-size", "16", "--ch", "8", "--nz", "8", "--val-frac", "0.25",
        "--log-every", "2", "--n-eval", "16"]
KEYS = ("EnergyDeposit", "ParticleMomentum", "ParticlePoint", "ParticlePDG")


def _sagan(capsys, *argv):
    return call_main(S, capsys, *argv)


_snapshot = folder_bytes


@pytest.fixture(scope="module")
def trained(tmp_path_factory, toy):
    """One tiny epoch on a data file whose name holds '[' (K: a file, not a glob) into a 250-character run
    folder (C: temporaries stay under the name limit) where the old fixed temporaries are folders (M)."""
    w = tmp_path_factory.mktemp("hostile_sagan")
    data = str(shutil.copy(toy("lhcb", 64, 0, ".npz"), w / "toy[1].npz"))
    out = w / ("r" * 250)
    for junk in ("ckpt.pt.tmp", "metrics.json.tmp", "generated.h5.tmp", "plots/mean_image.tmp.png"):
        os.makedirs(out / junk)
    assert S.main([*TINY, "--data", data, "--epochs", "1", "--out", str(out)]) == 0
    return SimpleNamespace(data=data, out=out)


def test_long_names_brackets_and_fixed_temporaries(trained, tmp_path, capsys):   # C, K, M
    files = {f for f in os.listdir(trained.out) if not f.endswith(".tmp")}
    assert files == {"ckpt.pt", "run.json", "log.txt", "metrics.json", "generated.h5", "generated.npz", "plots"}
    assert sorted(os.listdir(trained.out / "plots")) == sorted(
        ["mean_image.tmp.png", "mean_image.png", "asymmetry.png", "width.png", "sparsity.png", "energy_sum.png"])
    assert ".tmp" not in inspect.getsource(S)            # no fixed temporary name left in the script
    name = "s" * 247 + ".h5"                              # a valid 250-character file name
    r = _sagan(capsys, "--generate", 5, "--ckpt", trained.out / "ckpt.pt", "--conditions", trained.data,
               "--out", tmp_path / name)
    assert r.returncode == 0, r.stderr
    assert os.listdir(tmp_path) == [name]


def test_concurrent_writers_one_file(tmp_path):                 # M: unique temporaries per process and call
    img, mom = np.ones((4, 30, 30), np.float32), np.ones((4, 3), np.float32)
    errors = []

    def write():
        try:
            for _ in range(10):
                S.write_mlhep(str(tmp_path / "g.npz"), img, mom, mom, np.zeros(4, np.int32))
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=write) for _ in range(3)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == [] and os.listdir(tmp_path) == ["g.npz"]
    with np.load(tmp_path / "g.npz") as f:
        assert f["EnergyDeposit"].shape == (4, 30, 30)


@pytest.mark.parametrize("flags, words", [
    (["--bogus"], ["unrecognized arguments: --bogus"]),          # argparse printed its whole usage block
    (["--lr-g", "nan"], ["learning rates"]),                     # NaN passed 'lr <= 0'
    (["--aux-weight", "inf"], ["--aux-weight"]),
    (["--val-frac", "nan"], ["--val-frac"]),
    (["--epochs", "0"], ["--epochs"]),
])
def test_bad_flags_one_line(tmp_path, capsys, monkeypatch, flags, words):
    monkeypatch.chdir(tmp_path)
    _one_line_exit_2(_sagan(capsys, *TINY, *flags), "sagan_aux.py: error:", *words)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("out, make, words", [
    ("plain", None, ["--out plain", "is a file"]),                          # A: traceback from os.makedirs
    ("plain/run", None, ["plain is a file, not a folder"]),
    ("x" * 256, None, ["longer than 255"]),
    ("a/" + "x" * 300, None, ["longer than 255"]),                          # nothing made on the way ("a")
    ("run", "run/ckpt.pt/", ["run/ckpt.pt", "is a folder"]),                # B: found at the end of training
    ("run", "run/metrics.json/", ["run/metrics.json", "is a folder"]),
    ("run", "run/plots", ["run/plots", "is a file"]),
])
def test_train_out_unusable(trained, tmp_path, capsys, monkeypatch, out, make, words):
    plant(tmp_path, make)
    before = _snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    _one_line_exit_2(_sagan(capsys, *TINY, "--data", trained.data, "--out", out), *words)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("make, words", [("data", ["data/toy_lhcb_64_s0.h5", "cannot write"]),
                                         ("data/toy_lhcb_64_s0.h5/", ["toy_lhcb_64_s0.h5", "is a folder"])])
def test_toy_cache_unusable(tmp_path, capsys, monkeypatch, make, words):   # B for the toy data made without --data
    os.makedirs(tmp_path / make) if make.endswith("/") else (tmp_path / make).write_text("x")
    before = _snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    _one_line_exit_2(_sagan(capsys, *TINY, "--out", "run"), *words)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("out, words", [
    ("x.h5", ["--out x.h5", "is a folder"]),                      # B: IsADirectoryError, x.h5.tmp* left behind
    ("plain/g.h5", ["plain is a file, not a folder"]),            # A
    ("g" * 256 + ".h5", ["longer than 255"]),
])
def test_generate_out_unusable(trained, tmp_path, capsys, monkeypatch, out, words):
    (tmp_path / "plain").write_text("x")
    (tmp_path / "x.h5").mkdir()
    before = _snapshot(tmp_path)
    monkeypatch.chdir(tmp_path)
    r = _sagan(capsys, "--generate", 5, "--ckpt", trained.out / "ckpt.pt", "--conditions", trained.data, "--out", out)
    _one_line_exit_2(r, *words)
    assert _snapshot(tmp_path) == before


def _edit_ckpt(path, how):
    if how == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
    elif how == "text":
        open(path, "w").write("not a checkpoint\n")
    elif how == "other script":
        torch.save({"script": "wgan_gp.py", "model": {}, "optim": {}, "args": {}, "rng": [], "norm": {}}, path)
    elif how == "other, no script key":       # a checkpoint from before the "script" key, made by another script
        torch.save({"G": {}, "args": {"nz": 8}, "step": 3}, path)


@pytest.mark.parametrize("how, flags, words", [
    ("truncated", [], ["ckpt.pt: cannot read as a sagan_aux.py checkpoint"]),       # F: traceback
    ("text", [], ["ckpt.pt: cannot read as a sagan_aux.py checkpoint"]),
    ("other script", [], ["ckpt.pt: not a sagan_aux.py checkpoint (made by wgan_gp.py)"]),
    ("other, no script key", [], ["ckpt.pt: not a sagan_aux.py checkpoint"]),
    (None, ["--ch", "16"], ["model flags differ", "--ch 8 there, 16 now"]),         # F: accepted silently
    (None, ["--nz", "4"], ["--nz 8 there, 4 now"]),
    (None, ["--aux", "width"], ["--aux asymmetry there, width now"]),
    (None, ["--baseline"], ["--baseline False there, True now"]),
    ("legacy", ["--ch", "16"], ["--ch 8 there, 16 now"]),   # a run folder from before run.json
])
def test_resume_refused(trained, tmp_path, capsys, how, flags, words):
    run = tmp_path / "run"
    shutil.copytree(trained.out, run)
    if how == "legacy":
        os.remove(run / "run.json")
        ck = torch.load(run / "ckpt.pt", weights_only=False)
        del ck["script"]
        torch.save(ck, run / "ckpt.pt")
    else:
        _edit_ckpt(run / "ckpt.pt", how)
    before = _snapshot(tmp_path)
    r = _sagan(capsys, *TINY, *flags, "--data", trained.data, "--epochs", "2", "--resume", "--out", run)
    _one_line_exit_2(r, "ckpt.pt", *words)
    assert _snapshot(tmp_path) == before                 # log.txt not appended, ckpt.pt as it was


def test_resume_legacy_folder_works(trained, tmp_path, capsys):
    """A run folder and checkpoint from before run.json and the "script" key resume as before."""
    run = tmp_path / "run"
    shutil.copytree(trained.out, run)
    os.remove(run / "run.json")
    ck = torch.load(run / "ckpt.pt", weights_only=False)
    del ck["script"]
    torch.save(ck, run / "ckpt.pt")
    r = _sagan(capsys, *TINY, "--n-eval", "4", "--data", trained.data, "--epochs", "2", "--resume", "--out", run)
    assert r.returncode == 0, r.stderr
    assert torch.load(run / "ckpt.pt", weights_only=False)["epoch"] == 2 and (run / "run.json").exists()


@pytest.mark.parametrize("how", ["truncated", "text", "other script"])
def test_generate_bad_checkpoint(trained, tmp_path, capsys, how):   # E
    shutil.copy(trained.out / "ckpt.pt", tmp_path / "ckpt.pt")
    _edit_ckpt(tmp_path / "ckpt.pt", how)
    before = _snapshot(tmp_path)
    r = _sagan(capsys, "--generate", 5, "--ckpt", tmp_path / "ckpt.pt", "--conditions", trained.data,
               "--out", tmp_path / "g.h5")
    _one_line_exit_2(r, "ckpt.pt", "sagan_aux.py checkpoint")
    assert _snapshot(tmp_path) == before


def test_another_scripts_run_folder(trained, tmp_path, capsys):   # L
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "run.json").write_text('{"script": "wgan_gp.py", "model": {"hidden": 8}}')
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "metrics.json").write_text('{"script": "vaegan.py"}')   # a folder from before run.json
    before = _snapshot(tmp_path)
    for out, script in (("w", "wgan_gp.py"), ("v", "vaegan.py")):
        for resume in ([], ["--resume"]):
            r = _sagan(capsys, *TINY, "--data", trained.data, "--out", tmp_path / out, *resume)
            _one_line_exit_2(r, f"a run folder of {script}")
    assert _snapshot(tmp_path) == before


def _bad_data(src, dst, key, fn):
    with np.load(src) as f:
        d = {k: f[k] for k in KEYS}
    d[key] = fn(d[key])
    np.savez(dst, **d)
    return str(dst)


def _cell(value, dtype):
    def fn(e):
        e = e.astype(dtype)
        e[3, 15, 15] = value
        return e
    return fn


def _cell2(value):
    def fn(a):
        a = a.astype(np.float64)
        a[5, 1] = value
        return a
    return fn


def _pz(a):
    a = a.astype(np.float64)
    a[:, 2] = 1e-40                                       # > 0 in float64, 0 in float32: centre = 25 p_xy / 0
    return a


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize("key, fn, words, conditions_too", [
    ("EnergyDeposit", lambda a: a.astype("S12"), ["'EnergyDeposit' has dtype |S12"], False),    # G
    ("ParticleMomentum", lambda a: a.astype(np.complex128), ["'ParticleMomentum' has dtype complex128"], True),  # H
    ("ParticlePoint", _cell2(1e39), ["'ParticlePoint'", "not finite in float32"], True),      # I: passed float64
    ("EnergyDeposit", _cell(1e39, np.float64), ["'EnergyDeposit'", "not finite in float32"], False),
    ("EnergyDeposit", _cell(1e30, np.float32), ["EnergyDeposit spans too many decades", "float32"], False),  # log1p
    ("ParticleMomentum", _pz, ["shower centre", "not finite in float32"], False),
])
def test_bad_values(trained, tmp_path, capsys, key, fn, words, conditions_too):
    bad = _bad_data(trained.data, tmp_path / "bad.npz", key, fn)
    _one_line_exit_2(_sagan(capsys, *TINY, "--data", bad, "--out", tmp_path / "run"), "bad.npz", *words)
    assert os.listdir(tmp_path) == ["bad.npz"]
    if conditions_too:                                    # --conditions of --generate: the same checks
        r = _sagan(capsys, "--generate", 5, "--ckpt", trained.out / "ckpt.pt", "--conditions", bad,
                   "--out", tmp_path / "g.h5")
        _one_line_exit_2(r, "bad.npz", *words)
        assert os.listdir(tmp_path) == ["bad.npz"]


def test_non_finite_results_not_written(trained, tmp_path, capsys, monkeypatch):   # I
    """NaN metrics are not written; a model that turns NaN is refused at its checkpoint, and the previous
    checkpoint is kept; NaN showers are never written."""
    run = tmp_path / "run"
    shutil.copytree(trained.out, run)
    before = _snapshot(run)
    prd = S.common.lhcb_prd
    monkeypatch.setattr(S.common, "lhcb_prd", lambda *a, **k: {**prd(*a, **k), "prd_auc_physics": float("nan")})
    r = _sagan(capsys, *TINY, "--data", trained.data, "--epochs", "2", "--resume", "--out", run)
    _one_line_exit_2(r, "metrics.json", "not finite")
    after = _snapshot(run)
    assert after.keys() == before.keys() and after["metrics.json"] == before["metrics.json"]
    assert after["ckpt.pt"] != before["ckpt.pt"]            # epoch 2 was fine and saved
    monkeypatch.undo()
    step = S.train_step

    def nan_step(nets, *a):
        out = step(nets, *a)
        with torch.no_grad():
            next(nets[0].parameters()).fill_(float("nan"))
        return out
    monkeypatch.setattr(S, "train_step", nan_step)
    r = _sagan(capsys, *TINY, "--data", trained.data, "--epochs", "3", "--resume", "--out", run)
    _one_line_exit_2(r, "ckpt.pt", "not finite", "the previous file is kept")
    final = _snapshot(run)
    assert final.keys() == before.keys() and final["ckpt.pt"] == after["ckpt.pt"]
    with pytest.raises(S.DataError, match="generated showers: not finite"):
        S.write_mlhep(str(tmp_path / "g.h5"), np.full((2, 30, 30), np.nan, np.float32), np.ones((2, 3)),
                      np.ones((2, 3)), np.zeros(2))
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_torchrun_bad_input_once(trained, tmp_path):   # N: one line from rank 0, every rank exits 2, no hang
    (tmp_path / "plain").write_text("x")
    p = run_torchrun("sagan_aux.py", *TINY, "--data", trained.data, "--out", "plain/run", cwd=tmp_path, timeout=120)
    assert p.returncode != 0
    ours = [ln for ln in p.stderr.splitlines() if "sagan_aux.py: error:" in ln]
    assert ours == ["sagan_aux.py: error: --out plain/run: " + str(tmp_path / "plain") + " is a file, not a folder"]
    codes = [ln.split(":")[1].split()[0] for ln in p.stderr.splitlines() if ln.strip().startswith("exitcode")]
    assert codes == ["2", "2"], p.stderr[-3000:]            # neither rank stopped by torchrun's SIGTERM
    assert "sagan_aux.py\", line" not in p.stderr          # no traceback through the script (torchrun's own follows)
    assert os.listdir(tmp_path) == ["plain"]
