"""`opdlab distill` end to end on tiny random Llama models: files, metrics, every method and loss, errors.

Each run is a few steps on ~30 k-parameter models, so the whole file takes well under a minute.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from opdlab.cli import main
from opdlab.distill import checkpoint as ckpt_module
from opdlab.distill.losses import LOSS_KINDS
from opdlab.models.zoo import save_random_model

TRAIN_KEYS = {"train/loss", "train/reverse_kl", "train/grad_norm", "train/lr", "train/completion_tokens",
              "train/tokens_per_s", "time/rollout_s", "time/score_s", "time/update_s"}
SMALL = ["--set", "rollout.prompts_per_step=4", "--set", "rollout.samples_per_prompt=2",
         "--set", "rollout.max_new_tokens=6", "--set", "data.num_eval=6", "--set", "run.threads=1"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    return save_random_model(root / "student", seed=1), save_random_model(root / "teacher", seed=2, hidden_size=48)


def run(pair, out: Path, *extra: str, steps: int = 2) -> int:
    student, teacher = pair
    return main(["distill", "--student", str(student), "--teacher", str(teacher), "--task", "addition",
                 "--steps", str(steps), "--out", str(out), *SMALL, *extra])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_opd_run_writes_every_file_and_metric(pair, tmp_path):
    out = tmp_path / "run"
    assert run(pair, out, "--set", "run.eval_every=1", "--set", "run.save_every=1",
               "--set", "run.keep_checkpoints=1") == 0
    for name in ("config.yaml", "metrics.jsonl", "run.json", "final/config.json", "final/model.safetensors",
                 "final/tokenizer.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    # keep_checkpoints=1: only the newest step checkpoint remains, with full trainer state.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    for name in ("master.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json"):
        assert (out / "checkpoints/step-2/trainer_state" / name).is_file(), name
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert set(rows[0]) == {"step", "eval/accuracy", "eval/reverse_kl", "eval/reverse_kl_se", "eval/answer_logp",
                            "eval/answer_logp_se", "eval/num_examples"}  # step 0 is evaluation only
    for row in rows[1:]:
        assert TRAIN_KEYS | {"train/reward", "eval/accuracy", "eval/reverse_kl"} <= set(row)
        assert all(math.isfinite(v) for v in row.values())
        assert row["train/completion_tokens"] > 0
        # The default loss is the full-vocabulary reverse KL, which is also the logged KL.
        assert row["train/loss"] == pytest.approx(row["train/reverse_kl"], rel=1e-5)
    # Storage dtype: bf16 by default.
    assert {t.dtype for t in load_file(str(out / "final/model.safetensors")).values()} == {torch.bfloat16}


def test_final_checkpoint_loads_with_plain_transformers_and_matches(pair, tmp_path, monkeypatch):
    """final/ (bf16) matches the in-memory student up to bf16 rounding; final-fp32/ matches exactly."""
    from transformers import AutoModelForCausalLM

    captured = {}
    original = ckpt_module.save_final

    def capture(run_dir, model, tokenizer, save_dtype):
        captured["model"] = model
        return original(run_dir, model, tokenizer, save_dtype)

    monkeypatch.setattr(ckpt_module, "save_final", capture)
    out = tmp_path / "run"
    assert run(pair, out, "--save-dtype", "both", "--lr", "1e-2") == 0
    ids = torch.tensor([[1, 5, 12, 13, 20, 6]])
    with torch.no_grad():
        expected = captured["model"].eval()(ids).logits
        exact = AutoModelForCausalLM.from_pretrained(out / "final-fp32")(ids).logits
        bf16 = AutoModelForCausalLM.from_pretrained(out / "final", dtype="auto")
        assert next(bf16.parameters()).dtype == torch.bfloat16
        rounded = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32)(ids).logits
    assert torch.equal(exact, expected)
    assert not torch.equal(rounded, expected)  # the storage dtype really rounds ...
    torch.testing.assert_close(rounded, expected, atol=5e-2, rtol=2e-2)  # ... by bf16's precision only


@pytest.mark.parametrize("method", ["sft", "rl"])
def test_sft_and_rl_runs(pair, tmp_path, method):
    out = tmp_path / method
    assert run(pair, out, "--method", method, "--set", "run.eval_every=1") == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert TRAIN_KEYS | {"train/reward", "eval/accuracy"} <= set(row)
        assert 0.0 <= row["train/reward"] <= 1.0
    assert (out / "final/model.safetensors").is_file()


@pytest.mark.parametrize("loss", LOSS_KINDS)
def test_every_opd_loss_trains(pair, tmp_path, loss):
    out = tmp_path / loss
    assert run(pair, out, "--loss", loss, "--lr", "1e-2", steps=1) == 0
    row = metrics(out)[1]
    assert math.isfinite(row["train/loss"]) and row["train/grad_norm"] > 0
    before = load_file(str(pair[0] / "model.safetensors"))
    after = load_file(str(out / "checkpoints/step-1/trainer_state/master.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in after)


def test_gradient_accumulation_matches_one_big_batch(pair, tmp_path):
    """Micro-batches of 2 rows give the gradient of the whole step (normalized by all its tokens)."""
    finals = []
    for micro in (2, 8):
        out = tmp_path / f"micro{micro}"
        assert run(pair, out, "--optimizer", "sgd", "--lr", "0.5", "--set", "optim.momentum=0",
                   "--set", "optim.grad_clip=0", "--set", f"rollout.micro_batch={micro}", steps=1) == 0
        finals.append(load_file(str(out / "checkpoints/step-1/trainer_state/master.safetensors")))
        assert metrics(out)[1]["train/completion_tokens"] == metrics(tmp_path / "micro2")[1]["train/completion_tokens"]
    source = load_file(str(pair[0] / "model.safetensors"))
    moved = max(float((finals[1][k] - source[k]).abs().max()) for k in source)
    assert moved > 1e-4
    for k in finals[0]:
        torch.testing.assert_close(finals[0][k], finals[1][k], atol=1e-6, rtol=1e-5)


def test_padded_teacher_vocabulary(pair, tmp_path):
    teacher = save_random_model(tmp_path / "wide-teacher", seed=3, vocab_size=80)
    out = tmp_path / "run"
    assert main(["distill", "--student", str(pair[0]), "--teacher", str(teacher), "--task", "sort",
                 "--steps", "1", "--out", str(out), *SMALL]) == 0
    assert math.isfinite(metrics(out)[1]["train/reverse_kl"])


def test_masked_training_freezes_everything_outside_the_mask(pair, tmp_path):
    from opdlab.subnet.masks import mask_metadata, save_mask

    source = load_file(str(pair[0] / "model.safetensors"))
    gen = torch.Generator().manual_seed(0)
    masks = {k: torch.rand(v.shape, generator=gen) < 0.3 for k, v in source.items()}
    save_mask(tmp_path / "mask.safetensors", masks, mask_metadata("extract", masks))
    out = tmp_path / "run"
    assert run(pair, out, "--mask", str(tmp_path / "mask.safetensors"), "--lr", "1e-2",
               "--set", "optim.weight_decay=0.1", "--save-dtype", "fp32") == 0
    final = load_file(str(out / "final/model.safetensors"))
    changed = 0
    for k, m in masks.items():
        assert torch.equal(final[k][~m], source[k][~m]), k
        changed += int((final[k][m] != source[k][m]).sum())
    assert changed > 0


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_missing_prompt_field_is_one_line(pair, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "add:1+2", "answer": "3"}\n{"question": "add:2+2"}\n')
    code = main(["distill", "--student", str(pair[0]), "--teacher", str(pair[1]), "--prompts", str(prompts),
                 "--out", str(tmp_path / "run"), "--steps", "1"])
    assert code == 2
    err = _one_error_line(capsys)
    assert "line 2" in err and "'prompt'" in err


def test_mismatched_tokenizers_are_one_line(pair, tmp_path, capsys):
    teacher = save_random_model(tmp_path / "other", seed=4)
    spec = json.loads((teacher / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = "1", "2"  # swap two token ids: same size, different tokens
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (teacher / "tokenizer.json").write_text(json.dumps(spec))
    code = main(["distill", "--student", str(pair[0]), "--teacher", str(teacher), "--task", "addition",
                 "--out", str(tmp_path / "run"), "--steps", "1"])
    assert code == 2
    _one_error_line(capsys)


def test_non_model_folder_is_one_line(pair, tmp_path, capsys):
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "readme.txt").write_text("hi")
    code = main(["distill", "--student", str(tmp_path / "notamodel"), "--teacher", str(pair[1]),
                 "--out", str(tmp_path / "run")])
    assert code == 2
    assert "notamodel" in _one_error_line(capsys)


@pytest.mark.parametrize("flags, words", [
    (["--set", "run.bogus=1"], "run.bogus"),
    (["--lr", "-1"], "optim.lr"),
    (["--set", "run.tensorboard=true"], None),  # ok if tensorboard is installed, one line if not
])
def test_bad_config_is_one_line(pair, tmp_path, capsys, flags, words):
    code = run(pair, tmp_path / "run", *flags, steps=1)
    if words is None:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            assert code == 2 and "tensorboard" in _one_error_line(capsys)
        else:
            assert code == 0 and any((tmp_path / "run" / "tensorboard").iterdir())
        return
    assert code == 2
    assert words in _one_error_line(capsys)


def test_refuses_non_empty_out_without_overwrite(pair, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(pair, out, steps=1) == 0
    capsys.readouterr()  # the first run's progress bar
    assert run(pair, out, steps=1) == 2
    assert "--overwrite" in _one_error_line(capsys)
    assert run(pair, out, "--overwrite", steps=1) == 0


# ----------------------------------------------------------------------------- the parts, against direct references


def test_completion_mask_stops_after_first_eos():
    from opdlab.distill.rollout import completion_mask

    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert completion_mask(ids, [2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_scoring_a_left_padded_batch_equals_plain_forwards(tmp_path, arch):
    """Teacher scoring on the padded rollout gives each row's logits from an unpadded forward."""
    from transformers import AutoModelForCausalLM

    from opdlab.data.tasks import get_task
    from opdlab.data.prompts import render_prompts
    from opdlab.distill.rollout import completion_logits, roll_out, score
    from opdlab.models.loading import load_tokenizer

    folder = save_random_model(tmp_path / arch, arch=arch, seed=5)
    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), load_tokenizer(folder, "teacher")
    examples = get_task("mix").examples(5, seed=0, split="train")  # prompts of different lengths
    torch.manual_seed(0)
    batch = roll_out(model, tok, render_prompts(tok, [e.prompt for e in examples]), examples,
                     samples=2, max_new_tokens=6)
    assert len(set(int(m.sum()) for m in batch.attention_mask_BT[:, :batch.prompt_len])) > 1  # really padded
    logits = score(model, batch, vocab_size=model.config.vocab_size)
    with torch.no_grad():
        again = completion_logits(model, batch.rows(3, 7))  # a trimmed micro-batch gives the same values
    P = batch.prompt_len
    for b in range(batch.input_ids_BT.shape[0]):
        keep = batch.attention_mask_BT[b].bool()
        row = batch.input_ids_BT[b][keep]
        n = int(batch.mask_BC[b].sum())
        with torch.no_grad():
            ref = model(row[None]).logits[0]
        prompt_tokens = int(batch.attention_mask_BT[b, :P].sum())
        # Logits at positions prompt_tokens-1 ... predict the n completion tokens.
        torch.testing.assert_close(logits[b, :n], ref[prompt_tokens - 1:prompt_tokens - 1 + n], atol=1e-5, rtol=1e-4)
        if 3 <= b < 7:
            torch.testing.assert_close(again[b - 3, :n], logits[b, :n], atol=1e-5, rtol=1e-4)
    # Each completion's decoded text is its masked tokens.
    assert batch.completions[0] == tok.decode(batch.targets_BC[0][batch.mask_BC[0].bool()], skip_special_tokens=True)


def test_learning_rate_schedules():
    from opdlab.distill.train import lr_lambda

    warm_cos = lr_lambda("cosine", warmup_steps=2, total_steps=6)
    assert [round(warm_cos(s), 6) for s in range(6)] == [round(x, 6) for x in (
        1 / 3, 2 / 3, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)))]
    assert [lr_lambda("constant", 0, 5)(s) for s in range(5)] == [1.0] * 5


def test_run_threads_are_restored_after_training(tmp_path):
    import torch

    from opdlab.config import DistillConfig, load_config
    from opdlab.distill.train import train

    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    cfg = load_config(DistillConfig, None, {"run.steps": 1, "run.threads": wanted, "rollout.prompts_per_step": 2,
                                            "rollout.samples_per_prompt": 1, "rollout.max_new_tokens": 4,
                                            "data.num_eval": 2})
    train(cfg, tmp_path / "run", progress=False)
    assert torch.get_num_threads() == before
