"""Nothing untrusted is executed: pickles are refused everywhere a user can pass a file, remote code
stays off unless asked for, and the source has no unsafe loaders or shell-outs.

The payload is a pickle whose `__reduce__` opens (creates) a marker file when unpickled. A first
test proves the payload is live (plain `pickle.loads` creates the marker), so the refusals below
would fail if any path unpickled it.
"""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from helpers import cli_error, distill_args

import opdlab
from opdlab.cli import build_parser, main, to_config

SRC = Path(opdlab.__file__).parent


class Payload:
    """Unpickling this creates `self.marker` (through `open(marker, "w")`): a stand-in for any code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture()
def marker(tmp_path) -> Path:
    m = tmp_path / "PWNED"
    yield m
    assert not m.exists(), "a pickle payload ran"


def evil_bytes(marker: Path) -> bytes:
    return pickle.dumps({"model.norm.weight": Payload(marker)})


def test_the_payload_is_live(tmp_path):
    m = tmp_path / "PWNED"
    pickle.loads(evil_bytes(m))
    assert m.exists()
    m.unlink()
    torch.save({"state": Payload(m)}, tmp_path / "x.pt")
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert m.exists()


@pytest.fixture()
def evil_files(tmp_path, marker, pair) -> dict[str, Path]:
    """The payload under every name a user might hand over."""
    files = {}
    for name in ("evil.pt", "evil.bin", "evil.pkl", "evil.safetensors"):
        files[name] = tmp_path / name
        files[name].write_bytes(evil_bytes(marker))
    folder = tmp_path / "pickle_model"  # a model folder with pickle weights only
    folder.mkdir()
    shutil.copy(pair[0] / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(evil_bytes(marker))
    files["folder"] = folder
    return files


@pytest.mark.parametrize("name", ["evil.pt", "evil.bin", "evil.pkl", "evil.safetensors", "folder"])
def test_pickles_refused_by_analyze_compare_mask(pair, evil_files, tmp_path, marker, capsys, name):
    evil, good = str(evil_files[name]), str(pair[0])
    for argv in (["analyze", evil, good, "--out", str(tmp_path / "a")],
                 ["analyze", good, evil, "--out", str(tmp_path / "a")],
                 ["compare", good, good, evil, "--out", str(tmp_path / "c")],
                 ["mask", good, evil, "--out", str(tmp_path / "m.safetensors")]):
        line = cli_error(argv, capsys)
        assert evil in line, line


@pytest.mark.parametrize("name", ["evil.pt", "evil.safetensors"])
def test_pickles_refused_as_masks(pair, evil_files, tmp_path, marker, capsys, name):
    evil = str(evil_files[name])
    for argv in (["mask", "--random-like", evil, "--out", str(tmp_path / "r.safetensors")],
                 ["mask", "--union", evil, evil, "--out", str(tmp_path / "u.safetensors")],
                 ["mask", "--overlap", evil, evil, "--out", str(tmp_path / "o.json")],
                 distill_args(pair, tmp_path / "run", 1, "--mask", evil)):
        assert evil in cli_error(argv, capsys)


def test_pickle_weights_refused_as_student_or_teacher(pair, evil_files, tmp_path, marker, capsys):
    line = cli_error(distill_args((evil_files["folder"], pair[1]), tmp_path / "run", 1), capsys)
    assert "pickle" in line and "--student" in line
    line = cli_error(distill_args((pair[0], evil_files["folder"]), tmp_path / "run", 1), capsys)
    assert "pickle" in line and "--teacher" in line


def test_pickle_beside_safetensors_is_never_read(pair, tmp_path, marker):
    """A model folder with both: the safetensors weights load, the .bin is ignored."""
    student = tmp_path / "student"
    shutil.copytree(pair[0], student)
    (student / "pytorch_model.bin").write_bytes(evil_bytes(marker))
    assert main(distill_args((student, pair[1]), tmp_path / "run", 1)) == 0


@pytest.fixture(scope="module")
def finished_run(pair, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run") / "run"
    assert main(distill_args(pair, run, 2, "--set", "run.save_every=1")) == 0
    return run


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng.pt"])
def test_tampered_trainer_state_is_refused_on_resume(finished_run, tmp_path, marker, capsys, name):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    torch.save({"state": Payload(marker)}, run / "checkpoints/step-2/trainer_state" / name)
    line = cli_error(["distill", "--resume", str(run), "--steps", "3"], capsys)
    assert "checkpoints/step-2: cannot read the checkpoint's trainer state" in line


def test_custom_model_code_needs_trust_remote_code(pair, tmp_path, marker, capsys):
    """A folder whose config asks for its own Python code: refused, and the code never runs."""
    custom = tmp_path / "custom"
    shutil.copytree(pair[0], custom)
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="evilmodel", architectures=["EvilModel"],
                  auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    line = cli_error(distill_args((custom, pair[1]), tmp_path / "run", 1), capsys)
    assert str(custom) in line


def test_trust_remote_code_is_off_unless_passed():
    parser = build_parser()
    assert to_config(parser.parse_args(["distill"])).model.trust_remote_code is False
    assert to_config(parser.parse_args(["distill", "--trust-remote-code"])).model.trust_remote_code is True


# ----------------------------------------------------------------------------- static scan of src/


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _name(func: ast.expr) -> str:
    """'torch.load', 'os.system', 'open', ... for a call's function expression."""
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str) -> object:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
    return None


def scan(source: str) -> list[str]:
    """Unsafe patterns in one Python source (empty when clean)."""
    problems = []
    for call in _calls(ast.parse(source)):
        name, line = _name(call.func), call.lineno
        if name == "torch.load":
            if _kw(call, "weights_only") is not True:
                problems.append(f"line {line}: torch.load without weights_only=True")
        if _kw(call, "trust_remote_code") is True:
            problems.append(f"line {line}: trust_remote_code=True literal")
        if _kw(call, "shell") is True:
            problems.append(f"line {line}: shell=True")
        if name in {"os.system", "os.popen", "eval", "exec", "pickle.load", "pickle.loads", "yaml.load",
                    "yaml.unsafe_load", "yaml.full_load", "marshal.loads", "dill.load", "joblib.load"}:
            problems.append(f"line {line}: {name}")
        if name.split(".")[-1] == "from_pretrained" and name.split(".")[0].startswith("Auto"):
            # GGUF files hold raw tensors, not pickles: a gguf_file= load is the other safe form.
            if name.startswith("AutoModel") and _kw(call, "use_safetensors") is not True \
                    and _kw(call, "gguf_file") is None:
                problems.append(f"line {line}: {name} without use_safetensors=True")
            if _kw(call, "trust_remote_code") is None:  # unset = transformers asks on stdin
                problems.append(f"line {line}: {name} without an explicit trust_remote_code")
    return problems


def test_scan_catches_what_it_looks_for():
    bad = ("import torch, os, yaml, subprocess\n"
           "torch.load('x')\ntorch.load('x', weights_only=False)\nf(trust_remote_code=True)\n"
           "subprocess.run('ls', shell=True)\nos.system('ls')\nyaml.load(s)\neval('1')\n"
           "AutoModelForCausalLM.from_pretrained(p)\nAutoTokenizer.from_pretrained(p)\n")
    assert len(scan(bad)) == 10
    assert scan("torch.load('x', weights_only=True)\nyaml.safe_load(s)\nf(trust_remote_code=flag)\n") == []


def test_source_has_no_unsafe_loaders_or_shell_outs():
    problems = []
    for path in sorted(SRC.rglob("*.py")):
        problems += [f"{path.relative_to(SRC)}: {p}" for p in scan(path.read_text(encoding="utf-8"))]
    assert not problems, "\n".join(problems)
