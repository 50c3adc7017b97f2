"""README.md as a manual: its size, its wording, and its commands.

Every command in a ```bash block is parsed: the scripts it names must exist and every flag it
passes must be one the script's --help lists (with a valid value where the flag has choices);
a flag named in a script's section of prose must be that script's.
The cheap ones run as written: every script's --help (in one interpreter), and, in a temporary
folder, every `common.py toy` (with -n capped at TOY_N_MAX showers) and every evaluate.py command
whose input files those made (CUDA-only commands are skipped without CUDA).
"""
import json
import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache

import pytest
import torch

from conftest import REPO

README = REPO / "README.md"
MAX_BYTES = 20_000                 # issue 18: "at most ~20 KB"
FORBIDDEN = r"this task|I ran|load average|shared cores|engineers"   # issue 18's grep
TOY_N_MAX = 200
PYTHONS = {"python", "python3", ".venv/bin/python"}
MODEL_SCRIPTS = ("wgan_gp.py", "2dgan.py", "adagan.py", "sagan_aux.py", "vaegan.py")


def bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def commands(text):
    """Each shell command of the README's bash blocks as a token list (comments, `\\` joins,
    `&&` chains and leading VAR=value assignments handled)."""
    out = []
    for block in bash_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            cmd = []
            for t in tokens + ["&&"]:
                if t in ("&&", ";"):
                    while cmd and re.fullmatch(r"[A-Z_]+=\S*", cmd[0]):
                        cmd.pop(0)
                    if cmd:
                        out.append(cmd)
                    cmd = []
                else:
                    cmd.append(t)
    return out


def script_call(cmd):
    """(script, args) for `python X.py ...` and `torchrun ... X.py ...`; None otherwise."""
    if cmd[0] in PYTHONS and len(cmd) > 1 and cmd[1].endswith(".py"):
        return cmd[1], cmd[2:]
    if cmd[0] == "torchrun":
        i = next((i for i, t in enumerate(cmd) if t.endswith(".py")), None)
        return (cmd[i], cmd[i + 1:]) if i is not None else ("<no script>", [])
    return None


# Every script's --help in one interpreter (torch is imported once): {"script [sub]": [exit code, stdout]}.
HELP_DUMP = r"""
import contextlib, io, json, runpy, sys
out = {}
for spec in sys.argv[1:]:
    buf, code = io.StringIO(), None
    sys.argv = [*spec.split(), "--help"]
    with contextlib.redirect_stdout(buf):
        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
        except SystemExit as e:
            code = e.code
    out[spec] = [code, buf.getvalue()]
print(json.dumps(out))
"""


@lru_cache(maxsize=None)
def helps():
    specs = [p.name for p in sorted(REPO.glob("*.py"))] + ["common.py toy"]
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    r = subprocess.run([sys.executable, "-c", HELP_DUMP, *specs], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@lru_cache(maxsize=None)
def options(script, sub=None):
    """{flag: choices or None} from `script [sub] --help` (which must succeed)."""
    code, text = helps()[f"{script} {sub}" if sub else script]
    assert code in (0, None) and "usage:" in text, f"{script} {sub or ''} --help failed (exit {code})"
    usage = text.split("\n\n")[0]
    opts = {}
    for flag, choices in re.findall(r"\[(-{1,2}[\w-]+)(?: \{([^}]*)\}| [A-Z_]+)?\]", usage):
        opts[flag] = choices.split(",") if choices else None
    for flag in re.findall(r"(?<![\w-])(-{1,2}[a-zA-Z][\w-]*)", text):
        opts.setdefault(flag, None)
    return opts


def check(cmd):
    """Problems of one README command (an empty list when it is fine)."""
    text = " ".join(cmd)
    call = script_call(cmd)
    if call is None:
        if cmd[0] in PYTHONS and cmd[1:3] == ["-m", "pytest"]:
            return [f"{text}: {p} does not exist" for p in cmd[3:]
                    if not p.startswith("-") and not (REPO / p.split("::")[0]).exists()]
        if cmd[0] in PYTHONS and cmd[1:3] == ["-m", "venv"]:
            return []
        if cmd[0].endswith("pip") and cmd[1:3] == ["install", "-r"]:
            return [] if (REPO / cmd[3]).exists() else [f"{text}: {cmd[3]} does not exist"]
        if cmd[0] == "bash":
            return [] if (REPO / cmd[1]).exists() else [f"{text}: {cmd[1]} does not exist"]
        return [f"{text}: not a command this test knows (python, torchrun, pip, bash)"]
    script, args = call
    if not (REPO / script).is_file():
        return [f"{text}: no script {script}"]
    sub = None
    if script == "common.py":
        if not args or args[0] != "toy":
            return [f"{text}: common.py has only the `toy` command"]
        sub, args = "toy", args[1:]
    opts = options(script, sub)
    problems = []
    for i, tok in enumerate(args):
        if not tok.startswith("-") or re.fullmatch(r"-?\d[\d.e:-]*", tok):
            continue
        flag, _, value = tok.partition("=")
        if flag not in opts:
            problems.append(f"{text}: {script} has no flag {flag}")
            continue
        if not value and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
        if opts[flag] and value not in opts[flag]:
            problems.append(f"{text}: {flag} {value!r} is not one of {opts[flag]}")
    return problems


def test_size_and_wording():
    text = README.read_text()
    assert len(text.encode()) <= MAX_BYTES, f"README.md is {len(text.encode())} bytes (limit {MAX_BYTES})"
    assert "*pending*" not in text, "README.md still has *pending* placeholders"
    bad = [f"{i}: {line}" for i, line in enumerate(text.splitlines(), 1) if re.search(FORBIDDEN, line, re.I)]
    assert not bad, "README.md says:\n" + "\n".join(bad)


def test_every_command_names_existing_scripts_and_flags():
    bad_help = [spec for spec, (code, text) in helps().items() if code not in (0, None) or "usage:" not in text]
    assert not bad_help, f"--help fails: {bad_help}"
    cmds = commands(README.read_text())
    assert len(cmds) >= 20, f"only {len(cmds)} commands found in README.md's bash blocks"
    for script in MODEL_SCRIPTS + ("evaluate.py",):
        assert any((script_call(c) or ("",))[0] == script for c in cmds), f"README.md never runs {script}"
    problems = [p for c in cmds for p in check(c)]
    assert not problems, "\n".join(problems)


def prose_flags(text):
    """{section heading: flags named in its prose (code blocks removed)}."""
    out = {}
    for sec in re.split(r"^## ", text, flags=re.M)[1:]:
        head, _, body = sec.partition("\n")
        body = re.sub(r"```.*?```|`torchrun[^`]*`", "", body, flags=re.S)     # commands: checked above
        out[head] = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", body))
    return out


def test_flags_named_in_prose_exist():
    """A script's section names only its own flags; the shared section only flags of every model script."""
    problems = []
    for head, flags in prose_flags(README.read_text()).items():
        script = head.split(":")[0].strip()
        if (REPO / script).is_file() and script.endswith(".py"):
            problems += [f"{head}: {script} has no {f}" for f in flags if f not in options(script)]
        elif head.startswith("What every model script"):
            problems += [f"{head}: {s} has no {f}" for f in flags - {"--energy"} for s in MODEL_SCRIPTS
                         if f not in options(s)]
    assert not problems, "\n".join(problems)


def test_checker_catches_bad_commands():
    bad = commands("```bash\npython wgan_gp.py --epochs 3 --no-such-flag 1   # comment\n"
                   "python evaluate.py a.h5 b.h5 --device tpu\npython nope.py\n"
                   "python -m pytest tests/test_nothing.py\nrm -rf data\n```\n")
    found = [check(c) for c in bad]
    assert all(len(f) == 1 for f in found), found
    assert "--no-such-flag" in found[0][0] and "tpu" in found[1][0]
    good = commands("```bash\nOMP_NUM_THREADS=1 python wgan_gp.py --epochs 3 --device cpu && \\\n"
                    "  python common.py toy lcd -n 5 -o x.h5\n```\n")
    assert [c[:2] for c in good] == [["python", "wgan_gp.py"], ["python", "common.py"]]
    assert not any(check(c) for c in good)
    prose = prose_flags("## wgan_gp.py: x\nuse `--no-such` or `torchrun --nproc_per_node=2 wgan_gp.py`\n"
                        "```bash\npython wgan_gp.py --also-not\n```\n")
    assert prose == {"wgan_gp.py: x": {"--no-such"}} and "--no-such" not in options("wgan_gp.py")


def cheap(cmd, made):
    """The command as it runs in the test (toy sizes capped), or None if it is not cheap."""
    call = script_call(cmd)
    if call is None or cmd[0] == "torchrun":
        return None
    script, args = call
    if script == "common.py":
        args = list(args)
        if "-n" in args:
            i = args.index("-n") + 1
            args[i] = str(min(int(args[i]), TOY_N_MAX))
        return [script, *args]
    if script == "evaluate.py":
        files = [a for a in args if a.endswith((".h5", ".npz")) and not a.startswith("-")]
        if files and all(f in made for f in files):
            if "cuda" in args and not torch.cuda.is_available():
                return None
            return [script, *args]
    if "--help" in args:
        return [script, *args]
    return None


def test_cheap_commands_run_as_written(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    made, ran = set(), []
    for cmd in commands(README.read_text()):
        run = cheap(cmd, made)
        if run is None:
            continue
        r = subprocess.run([sys.executable, str(REPO / run[0]), *run[1:]], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{' '.join(cmd)} failed (exit {r.returncode}):\n{r.stderr[-2000:]}"
        if run[0] == "common.py":
            out = run[run.index("-o") + 1]
            assert (tmp_path / out).is_file(), f"{' '.join(cmd)} wrote no {out}"
            made.add(out)
        ran.append(" ".join(run))
    assert any(r.startswith("evaluate.py") for r in ran), f"no evaluate.py command ran: {ran}"
    assert sum(r.startswith("common.py toy") for r in ran) >= 3, ran
