"""Hostile input for vaegan.py (issue 16), root cause by root cause: one line on stderr naming the flag or file,
exit status 2, and the folder holds exactly what it held before (nothing written, appended or left behind).
main() runs in-process (a subprocess costs a torch import per case); one torchrun case (N)."""
import json
import os
import shutil

import h5py
import numpy as np
import pytest
import torch

import common
import vaegan
from conftest import run_torchrun
from test_hostile import _one_line_exit_2, call_main, folder_bytes, plant

TINY = ["--n-train", "20", "--ensemble", "1", "--batch-size", "10", "--channels", "2,2", "--latent", "2",
        "--mbd-kernels", "0", "--select-bins", "2", "--epochs", "1"]


def _main(capsys, *argv):
    return call_main(vaegan, capsys, *argv)


_state = folder_bytes


@pytest.fixture(scope="module")
def data(toy):
    return toy("ild10", 40)                         # 20 train, 20 held out


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
    """One tiny finished run (ckpt.pt, run.json, log.txt, ...), copied by the tests that change it."""
    out = tmp_path_factory.mktemp("run") / "run"
    assert vaegan.main(["--data", data, *TINY, "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("flags, word", [
    (["--bogus"], "--bogus"),                        # argparse printed its whole usage block first
    (["--lr", "1e39"], "--lr"),                      # I: inf in float32, the training dtype
    (["--kl-weight", "nan"], "--kl-weight"),
    (["--seed", "-1"], "--seed"),                    # numpy's seeding traceback
    (["--seed", str(2 ** 32)], "--seed"),
    (["--channels", "4"], "--channels"),
])
def test_bad_flags_one_line(data, tmp_path, capsys, monkeypatch, flags, word):
    monkeypatch.chdir(tmp_path)
    _one_line_exit_2(_main(capsys, "--data", data, *TINY, *flags), word)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("out, make, words", [
    ("plain", None, ["plain is a file, not a folder"]),                # A: traceback from os.makedirs
    ("plain/sub", None, ["plain is a file, not a folder"]),
    ("x" * 256, None, ["longer than 255"]),
    ("a/" + "x" * 300, None, ["longer than 255"]),                      # nothing made on the way ("a")
    ("o", "o/ckpt.pt/", ["o/ckpt.pt: is a folder"]),                    # B: a folder where a file goes
    ("o", "o/metrics.json/", ["o/metrics.json: is a folder"]),
    ("o", "o/log.txt/", ["o/log.txt: is a folder"]),
    ("o", "o/plots", ["o/plots: is a file"]),
])
def test_out_unusable(data, tmp_path, capsys, monkeypatch, out, make, words):
    plant(tmp_path, make)
    before = _state(tmp_path)
    monkeypatch.chdir(tmp_path)
    _one_line_exit_2(_main(capsys, "--data", data, *TINY, "--out", out), "--out", *words)
    assert _state(tmp_path) == before


@pytest.mark.parametrize("out, words", [
    ("x.h5", ["x.h5: is a folder"]),                                    # B: IsADirectoryError, x.h5.tmp* left
    ("plain/g.h5", ["plain is a file"]),                                # A
    ("n" * 256 + ".h5", ["longer than 255"]),
])
def test_generate_out_unusable(run, tmp_path, capsys, monkeypatch, out, words):
    (tmp_path / "plain").write_text("x")
    (tmp_path / "x.h5").mkdir()
    before = _state(tmp_path)
    monkeypatch.chdir(tmp_path)
    _one_line_exit_2(_main(capsys, "--generate", 5, "--ckpt", run / "ckpt.pt", "--out", out), "--out", *words)
    assert _state(tmp_path) == before


def test_long_names_and_brackets_work(data, run, tmp_path, capsys, monkeypatch):
    """C: a valid 250-character name (the temporaries stay short) for the run folder and a generated file;
    K: a data file whose name holds '[' is read as that file."""
    monkeypatch.chdir(tmp_path)
    shutil.copy(data, "t[1].h5")
    assert _main(capsys, "--data", "t[1].h5", *TINY, "--out", "d" * 250).returncode == 0
    assert sorted(os.listdir("d" * 250)) == ["ckpt.pt", "generated.h5", "log.txt", "metrics.json", "run.json",
                                             "truth.h5"]
    name = "g" * 247 + ".h5"
    assert _main(capsys, "--generate", 5, "--ckpt", run / "ckpt.pt", "--out", name).returncode == 0
    assert sorted(os.listdir()) == ["d" * 250, name, "t[1].h5"]
    with h5py.File(name) as f:
        assert f["showers"].shape == (5, 10, 10) and np.isfinite(f["showers"][:]).all()


def _spoil(ckpt, how):
    """Make run/ckpt.pt truncated, text, another script's, or saved with other model flags."""
    if how == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:500])
    elif how == "text":
        ckpt.write_text("not a checkpoint")
    elif how == "other script":
        torch.save({"script": "wgan_gp.py", "generator": {}, "args": {}}, ckpt)
    elif how == "other script, old":
        torch.save({"G": {}, "step": 3}, ckpt)


@pytest.mark.parametrize("how, flags, words", [
    ("truncated", [], ["ckpt.pt", "not a readable vaegan.py checkpoint"]),      # F: tracebacks, log appended
    ("text", [], ["ckpt.pt", "not a readable vaegan.py checkpoint"]),
    ("other script", [], ["ckpt.pt", "a checkpoint of wgan_gp.py"]),
    ("other script, old", [], ["ckpt.pt", "unknown script"]),
    (None, ["--latent", "3"], ["--resume", "model flags", "latent"]),           # run.json names the flags
    ("no run.json", ["--channels", "2,3"], ["ckpt.pt", "other flags", "channels"]),   # a folder from before run.json
    (None, ["--ensemble", "2"], ["ckpt.pt", "ensemble"]),
    (None, ["--seed", "1"], ["ckpt.pt", "other flags", "seed"]),                  # another train/held-out split
    (None, ["--n-train", "15"], ["ckpt.pt", "other flags", "n_train"]),
])
def test_resume_bad_checkpoint(data, run, tmp_path, capsys, monkeypatch, how, flags, words):
    shutil.copytree(run, tmp_path / "run")
    if how == "no run.json":
        os.remove(tmp_path / "run" / "run.json")
    else:
        _spoil(tmp_path / "run" / "ckpt.pt", how)
    before = _state(tmp_path)
    monkeypatch.chdir(tmp_path)
    _one_line_exit_2(_main(capsys, "--data", data, *TINY, "--epochs", 2, "--out", "run", "--resume", *flags), *words)
    assert _state(tmp_path) == before              # log.txt not appended, no run.json rewritten


@pytest.mark.parametrize("how, words", [
    ("truncated", ["c.pt", "not a readable vaegan.py checkpoint"]),           # E
    ("other script", ["c.pt", "a checkpoint of wgan_gp.py"]),
])
def test_generate_bad_checkpoint(run, tmp_path, capsys, monkeypatch, how, words):
    shutil.copy(run / "ckpt.pt", tmp_path / "c.pt")
    _spoil(tmp_path / "c.pt", how)
    before = _state(tmp_path)
    monkeypatch.chdir(tmp_path)
    _one_line_exit_2(_main(capsys, "--generate", 5, "--ckpt", "c.pt", "--out", "g.h5"), *words)
    assert _state(tmp_path) == before


def _ild30(path, layers, energy):
    with h5py.File(path, "w") as f:
        f["30x30/layers"], f["30x30/energy"] = layers, energy


def _bad_data(path, case):
    rng = np.random.default_rng(0)
    s, e = rng.uniform(0, 5, (40, 10, 10)), rng.uniform(10, 90, (40, 1))
    arrays = {"str showers": {"showers": s.astype("S12")},                        # G: TypeError traceback
              "str energy": {"showers": s, "energy": np.array([str(v) for v in e[:, 0]], dtype=h5py.string_dtype())},
              "complex showers": {"showers": s.astype(np.complex64)},             # H: accepted with a warning
              "1e39 showers": {"showers": np.where(np.arange(100).reshape(10, 10) == 7, 1e39, s)},   # I
              "1e39 energy": {"showers": s, "energy": e * 1e38},
              "sums overflow": {"showers": np.full((40, 10, 10), 3e37)},           # finite, e_vis is not
              "showers a group": {}}.get(case)
    if case == "str layers":
        return _ild30(path, np.ones((2, 30, 30, 30)).astype("S3"), np.ones((2, 1)))
    with h5py.File(path, "w") as f:
        if case == "showers a group":
            f.create_group("showers")
        for k, v in arrays.items():
            f[k] = v


@pytest.mark.parametrize("case, words", [
    ("str showers", ["'showers' has dtype |S12"]),
    ("str energy", ["'energy' has dtype object"]),
    ("str layers", ["'30x30/layers' has dtype |S3"]),
    ("complex showers", ["'showers' has dtype complex64"]),
    ("1e39 showers", ["'showers'", "not finite in float32"]),
    ("1e39 energy", ["'energy'", "not finite in float32"]),
    ("sums overflow", ["summed energy overflows float32"]),
    ("showers a group", ["'showers' is a group"]),
])
def test_bad_dtypes_and_overflow(tmp_path, capsys, monkeypatch, case, words):
    monkeypatch.chdir(tmp_path)
    _bad_data("bad.h5", case)
    _one_line_exit_2(_main(capsys, "--data", "bad.h5", *TINY, "--out", "o"), "bad.h5", *words)
    assert os.listdir(tmp_path) == ["bad.h5"]


def test_non_finite_model_never_written(data, run, tmp_path, capsys, monkeypatch):
    """I: a model that turns NaN while training is refused before its checkpoint is written (the previous one
    stays, byte for byte); a checkpoint that samples inf writes no generated file."""
    shutil.copytree(run, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    step = vaegan.train_step

    def nan_step(mb, x, args):
        out = step(mb, x, args)
        with torch.no_grad():
            mb.model.dec.fc.weight.fill_(float("nan"))
        return out
    monkeypatch.setattr(vaegan, "train_step", nan_step)
    before = _state(tmp_path / "run")
    _one_line_exit_2(_main(capsys, "--data", data, *TINY, "--epochs", 2, "--out", "run", "--resume"),
                     "ckpt.pt", "not finite")
    after = _state(tmp_path / "run")
    assert {k: v for k, v in after.items() if k != "log.txt"} == {k: v for k, v in before.items() if k != "log.txt"}
    ck = torch.load(run / "ckpt.pt", weights_only=False)
    ck["members"][0]["best"]["dec"]["lc2.bias"].fill_(1e30)              # softplus(1e30) * scale: inf MeV
    torch.save(ck, "inf.pt")
    _one_line_exit_2(_main(capsys, "--generate", 5, "--ckpt", "inf.pt", "--out", "g.h5"), "g.h5", "not finite")
    assert sorted(os.listdir()) == ["inf.pt", "run"]


def test_non_finite_metrics_never_written(toy, tmp_path, capsys, monkeypatch):
    """I: a NaN in the amplification study stops the run's end before any of generated.h5, truth.h5, the plot
    or metrics.json is written (the checkpoint of the finished epochs stays)."""
    study = common.ild10_amplification

    def nan_study(*a, **k):
        res = study(*a, **k)
        res["e_vis"]["gen_jsd"] = res["e_vis"]["gen_jsd"] * np.nan
        return res
    monkeypatch.setattr(common, "ild10_amplification", nan_study)
    monkeypatch.chdir(tmp_path)
    _one_line_exit_2(_main(capsys, "--data", toy("ild10", 60), *TINY, "--out", "o", "--amplify", "--quantiles", "2",
                           "--amp-n", "100"), "o/metrics.json", "not finite")
    assert sorted(os.listdir("o")) == ["ckpt.pt", "log.txt", "run.json"]


@pytest.mark.parametrize("stamp", [{"run.json": {"script": "wgan_gp.py", "model": {}}},
                                   {"metrics.json": {"script": "2dgan.py"}}])        # a folder from before run.json
@pytest.mark.parametrize("resume", [[], ["--resume"]])
def test_other_scripts_run_folder(data, tmp_path, capsys, monkeypatch, stamp, resume):
    """L: another script's run folder was overwritten (ckpt.pt, metrics.json), or a KeyError on --resume."""
    (tmp_path / "o").mkdir()
    for name, content in stamp.items():
        (tmp_path / "o" / name).write_text(json.dumps(content))
    (tmp_path / "o" / "ckpt.pt").write_text("theirs")
    before = _state(tmp_path)
    monkeypatch.chdir(tmp_path)
    made_by = next(iter(stamp.values()))["script"]
    _one_line_exit_2(_main(capsys, "--data", data, *TINY, "--out", "o", *resume), "--out o", f"run folder of {made_by}")
    assert _state(tmp_path) == before


def test_every_output_written_atomically(toy, tmp_path, capsys, monkeypatch):
    """M: every file of a run (the amplification plot too) goes through common.write_atomic (a temporary name
    unique per process and call), none under a fixed name such as ckpt.pt.tmp; nothing is left behind."""
    names = []
    atomic = common.write_atomic
    monkeypatch.setattr(common, "write_atomic", lambda path, write: (names.append(path), atomic(path, write))[1])
    monkeypatch.chdir(tmp_path)
    r = _main(capsys, "--data", toy("ild10", 60), *TINY, "--out", "o", "--amplify", "--quantiles", "2",
              "--amp-n", "100")
    assert r.returncode == 0, r.stderr
    got = sorted(os.path.relpath(p, "o") for p in names)
    assert got == ["ckpt.pt", "generated.h5", "metrics.json", "plots/amplification.png", "run.json", "truth.h5"]
    assert sorted(_state("o")) == sorted(got + ["log.txt", "plots"])


def test_torchrun_bad_input_once(tmp_path):
    """N: under torchrun every rank checks its input before any process group: the error is printed once
    (rank 0) and every rank exits with status 2, no hang."""
    r = run_torchrun("vaegan.py", "--data", "missing.h5", "--out", "o", cwd=tmp_path, timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("vaegan.py: error:") == 1 and "missing.h5: no such file" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr.split("vaegan.py: error:")[0]
    assert r.stderr.count("exitcode  : 2") == 2, r.stderr           # torchrun's summary: both ranks, neither killed
    assert os.listdir(tmp_path) == []
