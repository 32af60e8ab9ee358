"""The built-in pairs' tokenizer: one token per character, saved as a real Hugging Face tokenizer.

It has bos/eos/pad/unk tokens, chat role markers and a Jinja chat template, so the
trainer renders prompts for the tiny pairs through exactly the code path it uses for
real models (`apply_chat_template`, `decode(..., skip_special_tokens=True)`).

    tok = build_tokenizer()
    ids = tok.apply_chat_template([{"role": "user", "content": "add:12+5"}], add_generation_prompt=True)
    tok.decode(ids)   # '<bos><|user|>add:12+5<|assistant|>'
    tok.save_pretrained(folder); AutoTokenizer.from_pretrained(folder)   # same tokenizer back

A rendered conversation is `<bos>` then, per message, a role marker and its content; an
assistant message ends with `<eos>`, which is what a model learns to emit to stop.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK, *ROLE_TOKENS.values()]
# Every character the built-in tasks use, plus a little room for hand-written prompts.
CHARACTERS = string.digits + string.ascii_lowercase + "+-*=:,.? "

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{{ message['content'] }}{{ eos_token }}"
    "{% else %}{{ raise_exception('unknown chat role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def vocabulary() -> dict[str, int]:
    """Token -> id: special tokens first (pad = 0), then one id per character."""
    tokens = SPECIAL_TOKENS + list(CHARACTERS)
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer(extra_special_tokens: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer with special tokens and a chat template (vocabulary < 64).

    `extra_special_tokens` (e.g. image placeholders of the VLM pairs) get ids after the text
    vocabulary, so every text token keeps the same id in every built-in tokenizer.
    """
    vocab = vocabulary()
    for token in extra_special_tokens:
        vocab[token] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Split text into single characters; special tokens are matched before this runs.
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    # Decoding glues characters back together (the default would join them with spaces).
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[*ROLE_TOKENS.values(), *extra_special_tokens],
        # Generation batches prompts on the left so every row ends at its generation prompt.
        padding_side="left",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
