"""The built-in character tokenizer: round trip, chat template, save/load as a real HF tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from opdlab.data.tasks import get_task
from opdlab.models.tokenizer import CHARACTERS, build_tokenizer


def _ids(encoded) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template; 4.x returned a list.
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_small_vocabulary_with_distinct_special_tokens() -> None:
    tok = build_tokenizer()
    assert len(tok) < 64
    special = {tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id}
    assert len(special) == 4 and None not in special
    assert tok.pad_token_id == 0


def test_every_task_character_is_one_token_and_round_trips() -> None:
    tok = build_tokenizer()
    for name in ("addition", "sort", "reverse"):
        for ex in get_task(name).examples(50, seed=0, split="train"):
            for text in (ex.prompt, ex.answer):
                ids = tok(text, add_special_tokens=False)["input_ids"]
                assert len(ids) == len(text)  # one token per character
                assert tok.unk_token_id not in ids
                assert tok.decode(ids) == text
    assert tok.decode(tok("add: 1 2")["input_ids"]) == "add: 1 2"  # spaces survive


def test_chat_template_renders_generation_prompt_and_eos() -> None:
    tok = build_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "add:12+5"}], tokenize=False, add_generation_prompt=True)
    assert text == "<bos><|user|>add:12+5<|assistant|>"
    ids = _ids(tok.apply_chat_template([{"role": "user", "content": "add:12+5"}], add_generation_prompt=True))
    assert ids[0] == tok.bos_token_id
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(ids[-1]) == "<|assistant|>"
    full = _ids(tok.apply_chat_template([{"role": "user", "content": "add:12+5"}, {"role": "assistant", "content": "71"}]))
    assert full[: len(ids)] == ids  # the conversation extends the generation prompt
    assert full[-1] == tok.eos_token_id
    assert tok.decode(full[len(ids):], skip_special_tokens=True) == "71"
    # role markers are single special tokens, never split into characters
    assert len(tok("<|user|>", add_special_tokens=False)["input_ids"]) == 1


def test_unknown_role_is_rejected() -> None:
    tok = build_tokenizer()
    with pytest.raises(Exception, match="unknown chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)


def test_save_and_load_with_auto_tokenizer(tmp_path: Path) -> None:
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    msgs = [{"role": "user", "content": "sort:dcba"}]
    assert _ids(loaded.apply_chat_template(msgs, add_generation_prompt=True)) == _ids(
        tok.apply_chat_template(msgs, add_generation_prompt=True)
    )
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<bos>", "<eos>", "<pad>")
    assert loaded.padding_side == "left"
    batch = loaded(["ab", "abcd"], padding=True, add_special_tokens=False)
    assert batch["input_ids"][0][:2] == [loaded.pad_token_id] * 2  # left padding


def test_characters_cover_the_tasks_without_duplicates() -> None:
    assert len(set(CHARACTERS)) == len(CHARACTERS)
