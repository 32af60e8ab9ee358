"""Roll out completions and score them: batched, left-padded, KV-cached.

A rollout batch is one padded tensor per step: the prompts, left-padded to a common
length P and rendered through the chat template, followed by the sampled completions
(right-padded). Every later pass (student loss, teacher scoring, evaluation) runs on
exactly these token ids, so teacher and student see the same rendering: a teacher that reads
the student's tokens through another chat template scores a different text and biases the
signal without any error (reported for the Tinker cookbook's distillation recipe,
thinking-machines-lab/tinker-cookbook issue #796).

    prompts = render_prompts(tok, [ex.prompt for ex in examples])      # opdlab.data.prompts
    batch = roll_out(student, tok, prompts, examples, samples=4, max_new_tokens=16)
    t_logits_BCV = score(teacher, batch, vocab_size=student.config.vocab_size)

Shapes: B rows (prompts x samples), T = P + C columns, C completion columns, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor

from opdlab.distill.decode import decode, unsupported_reason
from opdlab.distill.sampling import SeededSampling
from opdlab.errors import UserError

Role = Literal["student", "teacher"]  # whose reading of a batch: each model may see its own prompt


@dataclass
class Rollout:
    """Prompts and completions of one batch, padded together.

    input_ids_BT: left-padded prompt in columns [0, P), completion in [P, T).
    attention_mask_BT: 1 on real prompt tokens and completion tokens up to the first EOS.
    completion_mask_BT: 1 on completion tokens up to and including the first EOS; never prompt or pad.
    prompt_len: P.
    completions: decoded completions (special tokens and EOS stripped), one per row.
    examples: the example behind each row (a prompt repeated `samples` times sits in adjacent rows).
    teacher_view: the same completions behind the teacher's own prompts (method opsd: privileged
      context, `with_prompts`); None when the teacher reads this batch as the student does.

    The trainer reads a batch only through `num_rows`, `num_tokens`, `rows`, `logits` and
    `frozen_logits`, which `opdlab.distill.vlm.VisualRollout` has too.
    """

    input_ids_BT: Tensor
    attention_mask_BT: Tensor
    completion_mask_BT: Tensor
    prompt_len: int
    completions: list[str]
    examples: list[Any]
    teacher_view: "Rollout | None" = None

    @property
    def targets_BC(self) -> Tensor:
        """The completion tokens (the prediction targets), [B, C]."""
        return self.input_ids_BT[:, self.prompt_len:]

    @property
    def mask_BC(self) -> Tensor:
        """Completion mask restricted to the completion columns, [B, C]."""
        return self.completion_mask_BT[:, self.prompt_len:]

    @property
    def num_rows(self) -> int:
        """B, the number of completions."""
        return len(self.examples)

    @property
    def num_tokens(self) -> int:
        """Completion tokens in the batch (those the loss counts)."""
        return int(self.completion_mask_BT.sum())

    def logits(self, model: Any, role: Role, vocab_size: int | None = None) -> Tensor:
        """`completion_logits` of `model` reading the batch as `role` does, [B, C, V] (with autograd)."""
        return completion_logits(model, self.view(role), vocab_size)

    def frozen_logits(self, model: Any, role: Role, vocab_size: int) -> Tensor:
        """`score`: logits of a frozen `model` reading the batch as `role` does, [B, C, V], no autograd."""
        return score(model, self.view(role), vocab_size)

    def view(self, role: Role) -> "Rollout":
        """The token ids `role` reads: the teacher's own view where there is one, else this batch."""
        return self.teacher_view if role == "teacher" and self.teacher_view is not None else self

    def rows(self, start: int, stop: int) -> "Rollout":
        """Rows [start, stop) as a smaller rollout, with all-pad columns at both ends dropped."""
        ids, attn, comp = (t[start:stop] for t in (self.input_ids_BT, self.attention_mask_BT, self.completion_mask_BT))
        used = attn.any(dim=0)
        first_prompt = int(used[: self.prompt_len].float().argmax()) if bool(used[: self.prompt_len].any()) else self.prompt_len - 1
        first_prompt = min(first_prompt, self.prompt_len - 1)  # keep >= 1 prompt column: logits at P-1 predict token P
        completion_used = comp[:, self.prompt_len:].any(dim=0).nonzero()
        last = self.prompt_len + (int(completion_used.max()) + 1 if len(completion_used) else 1)
        return Rollout(
            ids[:, first_prompt:last], attn[:, first_prompt:last], comp[:, first_prompt:last],
            self.prompt_len - first_prompt, self.completions[start:stop], self.examples[start:stop],
            self.teacher_view.rows(start, stop) if self.teacher_view is not None else None,
        )


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token lists to a [B, P] id tensor and its attention mask."""
    if not seqs or min(len(s) for s in seqs) == 0:
        raise UserError("a prompt rendered to zero tokens; every prompt needs text")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS and the model's generation EOS ids."""
    ids: set[int] = set()
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif isinstance(source, (list, tuple)):
            ids.update(int(i) for i in source)
    return sorted(ids)


def completion_mask(completion_ids_BC: Tensor, eos_ids: Sequence[int]) -> Tensor:
    """1 on completion tokens up to and including the first EOS, 0 after it, [B, C] long."""
    is_eos = torch.isin(completion_ids_BC, torch.tensor(list(eos_ids), dtype=torch.long, device=completion_ids_BC.device))
    # Number of EOS tokens strictly before each position; a token is kept while that is 0.
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return (eos_before == 0).long()


@torch.no_grad()
def roll_out(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    examples: Sequence[Any],
    *,
    samples: int = 1,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
    seeds: Sequence[int] | None = None,
    fast: bool = True,
    logits_out: list[Tensor] | None = None,
    prefill_out: list[Any] | None = None,
) -> Rollout:
    """Sample `samples` completions per prompt (KV cache, stop at EOS).

    Sampling draws from torch's global RNG, so `torch.manual_seed` (and the RNG state saved
    in checkpoints) makes rollouts reproducible; with `seeds` (one per row, prompt-major) each
    row draws from its own generator instead (`opdlab.distill.sampling`), so a completion does not
    depend on its batch or process. top_k is off and no other logits processor runs, whatever the
    model folder's generation_config says: on-policy means sampling the model's own distribution
    (at `temperature`).

    Greedy and seeded rollouts of the Llama-family models run through `opdlab.distill.decode`
    (the same tokens as `generate`, faster: `fast=False` forces `generate`); sampling from the
    global RNG, other architectures and torchrun runs use `model.generate`. Under torchrun every
    rank steps `generate` together (`synced_gpus`): FSDP all-gathers in every forward.

    `logits_out`: on the fast path, each generation step's float32 logits [B, V] are appended to it
    (one per completion column), the distribution each token was chosen from; it stays empty when
    `generate` decodes. The evaluation reads the student's side of its reverse KL from them instead
    of a second forward pass. `prefill_out`: on the fast path, the prompts' prefill cache
    (`decode(prefill_out=...)`), for the evaluation's answer likelihood.
    """
    rows = [list(p) for p in prompt_ids for _ in range(samples)]
    row_examples = [ex for ex in examples for _ in range(samples)]
    device = next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer)
    synced = torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1
    was_training = model.training
    model.eval()
    try:
        if fast and (greedy or seeds is not None) and not synced and unsupported_reason(model) is None:
            ids, attn = left_pad([list(p) for p in prompt_ids], tokenizer.pad_token_id)
            pick = greedy_pick if greedy else SeededSampling(seeds, temperature, top_p, device).pick
            if logits_out is not None:
                pick = _recording(pick, logits_out)
            out = decode(model, ids.to(device), attn.to(device), max_new_tokens=max_new_tokens, eos_ids=eos,
                         pad_id=tokenizer.pad_token_id, pick=pick, repeats=samples, prefill_out=prefill_out)
            attn = attn.to(device).repeat_interleave(samples, dim=0)
        else:
            ids, attn = left_pad(rows, tokenizer.pad_token_id)
            ids, attn = ids.to(device), attn.to(device)
            out = _generate(model, ids, attn, eos, tokenizer.pad_token_id, max_new_tokens=max_new_tokens,
                            temperature=temperature, top_p=top_p, greedy=greedy, seeds=seeds, synced=synced)
    finally:
        model.train(was_training)
    prompt_len = attn.shape[1]
    completion = out[:, prompt_len:]
    comp_mask = completion_mask(completion, eos)
    input_ids = out
    attention = torch.cat([attn, comp_mask], dim=1)
    comp_full = torch.cat([torch.zeros_like(attn), comp_mask], dim=1)
    texts = decode_completions(tokenizer, completion, comp_mask)
    return Rollout(input_ids, attention, comp_full, prompt_len, texts, row_examples)


def _recording(pick: Callable[[Tensor, int], Tensor], out: list[Tensor]) -> Callable[[Tensor, int], Tensor]:
    """`pick` that also appends each step's logits to `out`."""
    def recorded(logits_BV: Tensor, position: int) -> Tensor:
        out.append(logits_BV)
        return pick(logits_BV, position)
    return recorded


def greedy_pick(logits_BV: Tensor, position: int) -> Tensor:
    """The most likely token of each row (the first on ties, as `generate`'s argmax)."""
    return torch.argmax(logits_BV, dim=-1)


def _generate(
    model: Any, ids: Tensor, attn: Tensor, eos: list[int], pad_id: int, *, max_new_tokens: int, temperature: float,
    top_p: float, greedy: bool, seeds: Sequence[int] | None, synced: bool,
) -> Tensor:
    """`model.generate` on left-padded rows [B, P] -> [B, P + C], with only the sampler `roll_out` asks for."""
    from transformers import GenerationConfig

    # The folder's generation_config (top_k, repetition penalty, ...) would be merged into any
    # config passed to generate, so it is swapped out for the call. top_k=0 turns off the
    # library's default top-k of 50.
    processors = None
    if seeds is not None and not greedy:
        from transformers import LogitsProcessorList

        processors = LogitsProcessorList([SeededSampling(seeds, temperature, top_p, ids.device)])
    sample = not greedy and processors is None  # seeded rows sample inside the processor, then argmax
    gen_cfg = GenerationConfig(
        do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None,
        top_k=0 if sample else None, max_new_tokens=max_new_tokens, eos_token_id=eos,
        pad_token_id=pad_id, use_cache=True,
    )
    saved_cfg = model.generation_config
    model.generation_config = gen_cfg
    try:
        return model.generate(input_ids=ids, attention_mask=attn, logits_processor=processors, synced_gpus=synced)
    finally:
        model.generation_config = saved_cfg


def decode_completions(tokenizer: Any, completion_ids_BC: Tensor, mask_BC: Tensor) -> list[str]:
    """Text of each completion: masked tokens only, special tokens (EOS) dropped."""
    seqs = [row[m.bool()].tolist() for row, m in zip(completion_ids_BC.cpu(), mask_BC.cpu())]
    return tokenizer.batch_decode(seqs, skip_special_tokens=True)


def completion_logits(model: Any, batch: Rollout, vocab_size: int | None = None, share_prompts: bool = True) -> Tensor:
    """Logits that predict each completion token, [B, C, V] (V cut to `vocab_size`).

    Position ids follow the attention mask, as in `generate`, so left padding does not shift
    positions. Only the last C+1 positions go through the LM head (`logits_to_keep`).

    When rows share a prompt (several samples per prompt) and the model is one `opdlab.distill.decode`
    covers, each distinct prompt runs through the model once (`shared_prompt_logits`): with
    autograd, its gradient is the sum over the rows that read it, as in the one-pass forward. The
    logits equal the one-pass forward's up to float32 rounding (tests/unit/test_shared_prompts.py).
    `share_prompts=False` forces the one-pass forward.
    """
    ids, attn = batch.input_ids_BT, batch.attention_mask_BT
    prompt = torch.cat([ids[:, : batch.prompt_len], attn[:, : batch.prompt_len]], dim=1)
    distinct, inverse = torch.unique(prompt, dim=0, return_inverse=True) if share_prompts else (prompt, None)
    if inverse is not None and distinct.shape[0] < ids.shape[0] and ids.shape[1] > batch.prompt_len \
            and unsupported_reason(model) is None:
        logits = shared_prompt_logits(model, batch, distinct, inverse)
    else:
        positions = (attn.cumsum(dim=1) - 1).clamp(min=0)
        num_completion = ids.shape[1] - batch.prompt_len
        logits = model(
            input_ids=ids, attention_mask=attn, position_ids=positions, logits_to_keep=num_completion + 1,
            use_cache=False,
        ).logits
        logits = logits[:, :-1]  # the last position predicts beyond the rollout
    if vocab_size is not None:
        logits = logits[..., :vocab_size]  # a padded teacher vocabulary: compare shared rows only
    return logits.float()


def shared_prompt_logits(model: Any, batch: Rollout, distinct: Tensor, inverse: Tensor) -> Tensor:
    """`completion_logits` with one pass per distinct prompt, [B, C, V].

    distinct: [U, 2P] the distinct rows of (prompt ids | prompt mask); inverse: [B] which one each row reads.
    1. The U prompts through the base model, keeping their keys and values (a `DynamicCache`).
    2. Those keys and values gathered to the B rows (`index_select`, differentiable), and the
       completion columns but the last through the model behind them: their logits predict
       completion tokens 2..C.
    3. Completion token 1 is predicted by the last prompt position: the LM head on that hidden state.
    """
    from transformers import DynamicCache

    ids, attn, p = batch.input_ids_BT, batch.attention_mask_BT, batch.prompt_len
    positions = (attn.cumsum(dim=1) - 1).clamp(min=0)
    prompt_ids, prompt_mask = distinct[:, :p], distinct[:, p:]
    cache = DynamicCache(config=model.config)
    hidden = model.model(input_ids=prompt_ids, attention_mask=prompt_mask,
                         position_ids=(prompt_mask.cumsum(dim=1) - 1).clamp(min=0), cache=cache,
                         use_cache=True).last_hidden_state
    first = model.lm_head(hidden[:, -1:].index_select(0, inverse))
    if ids.shape[1] - p == 1:
        return first
    rows = DynamicCache(config=model.config)
    for i, layer in enumerate(cache.layers):
        rows.update(layer.keys.index_select(0, inverse), layer.values.index_select(0, inverse), i)
    rest = model(input_ids=ids[:, p:-1], attention_mask=attn[:, :-1], position_ids=positions[:, p:-1], cache=rows,
                 use_cache=True).logits
    return torch.cat([first, rest], dim=1)


def score(teacher: Any, batch: Rollout, vocab_size: int) -> Tensor:
    """Teacher logits on exactly the student's tokens, [B, C, V], no autograd history.

    Runs under `torch.inference_mode()`; the result is cloned outside it so the loss may
    save it for the student's backward pass.
    """
    with torch.inference_mode():
        logits = completion_logits(teacher, batch, vocab_size)
    return logits.clone()


def with_prompts(batch: Rollout, prompt_ids: Sequence[Sequence[int]], pad_id: int) -> Rollout:
    """The same completion tokens behind other prompts, one per row: what a privileged teacher reads.

    Completion columns (ids, attention, completion mask) are copied unchanged, so logits of the
    result line up position by position with the student's on `batch` (`completion_logits`).
    """
    if len(prompt_ids) != batch.input_ids_BT.shape[0]:
        raise ValueError(f"with_prompts: {len(prompt_ids)} prompts for {batch.input_ids_BT.shape[0]} rows")
    ids, attn = left_pad(prompt_ids, pad_id)
    device = batch.input_ids_BT.device
    ids, attn = ids.to(device), attn.to(device)
    p = batch.prompt_len
    return Rollout(
        torch.cat([ids, batch.input_ids_BT[:, p:]], dim=1),
        torch.cat([attn, batch.attention_mask_BT[:, p:]], dim=1),
        torch.cat([torch.zeros_like(attn), batch.completion_mask_BT[:, p:]], dim=1),
        ids.shape[1], batch.completions, batch.examples,
    )
