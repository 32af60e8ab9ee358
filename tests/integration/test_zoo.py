"""The built-in pairs: they ship, copies into the cache, loads with plain transformers, and the
teacher is measurably stronger than the student on held-out prompts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opdlab import cli
from opdlab.data.tasks import get_task
from opdlab.errors import UserError
from opdlab.models import zoo
from opdlab.recipes import zoo_train


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OPDLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


PAIR_NAMES = [spec.name for spec in zoo.list_pairs()]


def test_default_pair_is_built_in() -> None:
    from opdlab.config import ModelConfig

    assert ModelConfig().pair in PAIR_NAMES


@pytest.mark.parametrize("name", PAIR_NAMES)
def test_shipped_pair_is_complete(name: str) -> None:
    shipped = zoo.shipped_dir(name)
    assert shipped is not None, f"src/opdlab/zoo_data/{name} is missing; see docs/zoo.md"
    meta = zoo.read_metadata(shipped)
    # shipped weights must come from the current recipe, or build_pair would re-copy them forever
    assert meta["spec"] == zoo.spec_dict(zoo.get_spec(name)), "regenerate the shipped pair (docs/zoo.md)"
    assert meta["student"]["step"] < meta["teacher"]["step"]


def test_build_copies_shipped_pair_into_cache_and_it_loads_with_plain_transformers(cache: Path) -> None:
    paths = zoo.build_pair("arith-tiny")
    assert paths.student == cache / "zoo" / "arith-tiny" / "student"
    assert paths.task == "addition" and zoo.is_cached("arith-tiny")
    meta = zoo.read_metadata(paths.student.parent)
    tok = AutoTokenizer.from_pretrained(paths.student)
    ids = tok.apply_chat_template([{"role": "user", "content": "add:12+5"}], add_generation_prompt=True)["input_ids"]
    assert tok.decode(ids) == "<bos><|user|>add:12+5<|assistant|>"
    for role in (paths.student, paths.teacher):
        model = AutoModelForCausalLM.from_pretrained(role)
        assert next(model.parameters()).dtype == torch.float32
        assert sum(p.numel() for p in model.parameters()) == meta["num_params"]
    # a second call finds the cache and does not copy again
    stamp = (paths.student / "model.safetensors").stat().st_mtime_ns
    assert zoo.build_pair("arith-tiny") == paths
    assert (paths.student / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("name", PAIR_NAMES)
def test_teacher_is_clearly_stronger_than_student_on_held_out_prompts(cache: Path, name: str) -> None:
    """Measured here, independently of the numbers recorded at build time.

    Shipped pairs measured 0.14 / 0.88 (arith-tiny) and 0.34 / 0.92 (sort-tiny) on this sample.
    """
    torch.manual_seed(0)
    paths = zoo.build_pair(name)
    tok = AutoTokenizer.from_pretrained(paths.student)
    # seed 1: a different held-out sample from the one the build used to pick checkpoints
    evals = get_task(paths.task).examples(100, seed=1, split="eval")
    acc = {}
    for role, folder in (("student", paths.student), ("teacher", paths.teacher)):
        model = AutoModelForCausalLM.from_pretrained(folder)
        acc[role] = zoo_train.greedy_accuracy(model, tok, evals)
    assert acc["student"] >= 0.08, acc
    assert acc["teacher"] >= 0.85, acc
    assert acc["teacher"] - acc["student"] >= 0.5, acc


def test_zoo_cli_list_and_build(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["zoo", "list"]) == 0
    out = capsys.readouterr().out
    assert "arith-tiny" in out and "addition" in out and "shipped" in out
    assert cli.main(["zoo", "build", "arith-tiny"]) == 0
    assert capsys.readouterr().out.strip() == str(cache / "zoo" / "arith-tiny")
    assert cli.main(["zoo", "list"]) == 0
    assert "cached" in capsys.readouterr().out
    assert cli.main(["zoo", "build", "no-such-pair"]) == 2
    assert "known pairs: " in capsys.readouterr().err
    assert cli.main(["zoo", "build"]) == 2


def test_unknown_pair_is_a_user_error() -> None:
    with pytest.raises(UserError, match="known pairs"):
        zoo.build_pair("gpt-huge")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_save_random_model_makes_a_loadable_folder(tmp_path: Path, arch: str) -> None:
    folder = zoo.save_random_model(tmp_path / arch, arch=arch, vocab_size=64)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == arch and model.config.vocab_size == 64
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) < 64


def test_training_sequences_supervise_only_the_answer_and_eos() -> None:
    from opdlab.data.tasks import Example
    from opdlab.models.tokenizer import build_tokenizer

    tok = build_tokenizer()
    ids, labels = zoo_train._encode(tok, [Example("add:47+86", "331", "addition"), Example("sort:ba", "ab", "sort")])
    assert tok.decode(ids[0]) == "<bos><|user|>add:47+86<|assistant|>331<eos>"
    assert tok.decode(labels[0][labels[0] != -100]) == "331<eos>"
    assert tok.decode(labels[1][labels[1] != -100]) == "ab<eos>"
    assert (ids[1][labels[1] == -100][-3:] == tok.pad_token_id).all()  # right padding, not supervised
