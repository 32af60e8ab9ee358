"""run.precision bf16-mixed (opdlab.distill.precision) against fp32 on a fixed batch.

Tolerances: bf16 keeps 8 significant bits, so each operand of a product is rounded by up to
2^-9 (0.2 %) relative; the products accumulate in fp32 and the rounding errors of a layer partly
cancel. On this batch the step's loss moves by ~0.2 % and its gradient by ~0.7 % (relative norm);
the tests allow 1 % and 3 %, and ask the gradient to point the same way (cosine > 0.999).
fp32 is the default and leaves every computation as it was (the exactness tests run in it).
"""

from __future__ import annotations

import json

import torch

from opdlab.config import DistillConfig, LossConfig, load_config
from opdlab.distill import precision as prec
from opdlab.distill.precision import compute_precision, precision_note
from opdlab.distill.rollout import completion_logits, roll_out
from opdlab.distill.sampling import row_seeds
from opdlab.distill.step import StepModels, accumulate_gradients, loss_function

from test_decode import Tok, tiny  # noqa: E402


def step_under(precision: str, student, teacher, batch):
    with compute_precision(precision, "cpu"):
        sums = accumulate_gradients(StepModels(student, teacher, None, 61, 8), batch, loss_function("opd", LossConfig()))
    grads = [p.grad for p in student.parameters()]
    flat = torch.cat([g.flatten() for g in grads])
    student.zero_grad(set_to_none=True)
    return sums, flat, {g.dtype for g in grads}


def test_bf16_mixed_step_matches_fp32_within_tolerance():
    student, teacher = tiny("llama", eos_bias=2.0).train(), tiny("llama", kv_heads=4)
    batch = roll_out(student, Tok(), [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [17, 18, 19]], list("abcd"),
                     samples=4, max_new_tokens=12, seeds=row_seeds(0, 1, 0, 4, 4))
    full, g32, _ = step_under("fp32", student, teacher, batch)
    mixed, g16, dtypes = step_under("bf16-mixed", student, teacher, batch)
    again, g32_again, _ = step_under("fp32", student, teacher, batch)
    assert full.loss == again.loss and torch.equal(g32, g32_again)  # fp32 untouched by a bf16 step in between
    assert abs(mixed.loss - full.loss) <= 0.01 * abs(full.loss)
    assert abs(mixed.reverse_kl - full.reverse_kl) <= 0.01 * abs(full.reverse_kl)
    assert float((g16 - g32).norm() / g32.norm()) <= 0.03
    assert float(torch.nn.functional.cosine_similarity(g16.double(), g32.double(), dim=0)) > 0.999
    assert mixed.loss != full.loss  # bf16 products did run
    assert dtypes == {torch.float32} and all(p.dtype == torch.float32 for p in student.parameters())  # master weights


def test_logits_and_loss_are_fp32_under_autocast():
    model = tiny("llama")
    batch = roll_out(model, Tok(), [[5, 6, 7]], ["a"], samples=2, max_new_tokens=4, seeds=row_seeds(0, 1, 0, 1, 2))
    with compute_precision("bf16-mixed", "cpu"):
        logits = completion_logits(model, batch)
        hidden = model.model(input_ids=batch.input_ids_BT).last_hidden_state
        product = model.lm_head(hidden)
    assert logits.dtype == torch.float32
    assert product.dtype == torch.bfloat16  # inside the region, matrix products are bf16


def test_note_only_where_bf16_would_be_emulated(monkeypatch):
    monkeypatch.setattr(prec, "has_bf16_units", lambda device: False)
    assert "slower than fp32" in precision_note("bf16-mixed", "cpu")
    assert precision_note("fp32", "cpu") is None
    monkeypatch.setattr(prec, "has_bf16_units", lambda device: True)
    assert precision_note("bf16-mixed", "cpu") is None


def test_a_bf16_mixed_run_trains_and_records_its_precision(tmp_path):
    from opdlab.distill.train import train

    cfg = load_config(DistillConfig, None, {"run.steps": 2, "run.precision": "bf16-mixed", "run.threads": 1,
                                            "rollout.prompts_per_step": 2, "rollout.samples_per_prompt": 2,
                                            "rollout.max_new_tokens": 4, "data.num_eval": 2, "run.save_every": 0})
    run = train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2] and all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows[1:])
    assert "precision: bf16-mixed" in (run / "config.yaml").read_text()
