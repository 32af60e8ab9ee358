"""`opdlab distill --method opsd` end to end: the student's frozen source model as a privileged teacher.

Control: with opd and the same folder as student and teacher the step-0 reverse KL is exactly
0; with opsd the teacher is that same model, yet the KL is positive, because it reads the
prompt with the privileged text. Runs use the built-in 1 M-parameter pair (shipped weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from opdlab.cli import main

SMALL = ["--steps", "2", "--set", "rollout.prompts_per_step=3", "--set", "rollout.samples_per_prompt=2",
         "--set", "rollout.max_new_tokens=5", "--set", "run.eval_every=1", "--set", "data.num_eval=6",
         "--set", "run.threads=1"]
# Words from the tiny tokenizer's alphabet (digits, a-z, "+-*=:,.? "), so the teacher prompt has no <unk>.
TEMPLATE = ['--set', 'data.privileged_template="{prompt} hint: {privileged}"']


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def run_info(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def write_prompts(path: Path, field: str | None, answers: bool = True, missing_at: int | None = None) -> Path:
    """20 sort prompts; with `field`, each record also carries a privileged worked solution under it."""
    letters = "abcdefgh"
    lines = []
    for i in range(20):
        word = "".join(letters[(i * 5 + 3 * k) % 8] for k in range(3 + i % 4))
        record: dict = {"prompt": f"sort:{word}"}
        if answers:
            record["answer"] = "".join(sorted(word))
        if field is not None:
            record[field] = f"count each letter of {word}, then write them a to h"
        if i == missing_at:
            record = {"prompt": record["prompt"]}  # neither privileged text nor an answer
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def builtin_opsd(tmp_path_factory) -> Path:
    """An opsd run on the built-in pair: no --student, no --teacher."""
    out = tmp_path_factory.mktemp("opsd") / "run"
    assert main(["distill", "--method", "opsd", "--out", str(out), *SMALL]) == 0
    return out


def test_opsd_teacher_is_the_students_source_and_still_disagrees(builtin_opsd):
    out = builtin_opsd
    info = run_info(out)
    assert info["status"] == "finished" and info["method"] == "opsd"
    assert info["teacher"] == info["student"] and Path(info["student"]).name == "student"  # the zoo pair's student
    assert yaml.safe_load((out / "config.yaml").read_text())["method"] == "opsd"
    rows = metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2]
    # Teacher weights == student weights at step 0; only the privileged prompt differs.
    assert rows[0]["eval/reverse_kl"] > 1e-3
    assert all(r["train/reverse_kl"] > 1e-3 for r in rows[1:])
    assert (out / "final" / "model.safetensors").is_file()


def test_control_opd_with_the_same_folder_has_zero_kl(builtin_opsd, tmp_path):
    student = run_info(builtin_opsd)["student"]
    out = tmp_path / "opd"
    assert main(["distill", "--method", "opd", "--student", student, "--teacher", student, "--task", "sort",
                 "--out", str(out), *SMALL]) == 0
    rows = metrics(out)
    assert rows[0]["eval/reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["train/reverse_kl"] == pytest.approx(0.0, abs=1e-6)
    # The same student and eval prompts under opsd (given only --student): positive, and the same
    # number as the built-in run, whose teacher was resolved without --student.
    out2 = tmp_path / "opsd"
    assert main(["distill", "--method", "opsd", "--student", student, "--task", "sort", "--out", str(out2), *SMALL]) == 0
    assert run_info(out2)["teacher"] == student
    assert metrics(out2)[0]["eval/reverse_kl"] == pytest.approx(metrics(builtin_opsd)[0]["eval/reverse_kl"], rel=1e-5)


def test_privileged_field_and_the_privileged_flag(builtin_opsd, tmp_path):
    """The default field, a custom field via --privileged, and the answer fallback, on one prompts file.

    The same privileged text under `privileged` or under `--privileged hint` gives identical runs; the
    answer fallback (no such field) gives a different teacher and so a different KL.
    """
    student = run_info(builtin_opsd)["student"]

    def kl0(name: str, prompts: Path, *extra: str) -> float:
        out = tmp_path / name
        assert main(["distill", "--method", "opsd", "--student", student, "--prompts", str(prompts),
                     "--out", str(out), *SMALL, *TEMPLATE, *extra]) == 0
        return metrics(out)[0]["eval/reverse_kl"]

    default_field = kl0("default", write_prompts(tmp_path / "a.jsonl", "privileged"))
    custom_field = kl0("custom", write_prompts(tmp_path / "b.jsonl", "hint"), "--privileged", "hint")
    answer_only = kl0("answer", write_prompts(tmp_path / "c.jsonl", "hint"))  # 'hint' ignored: the answer is used
    assert default_field > 0 and answer_only > 0
    assert custom_field == pytest.approx(default_field, rel=1e-6)
    assert answer_only != pytest.approx(default_field, rel=1e-3)
    assert yaml.safe_load((tmp_path / "custom" / "config.yaml").read_text())["data"]["privileged_field"] == "hint"


def test_a_record_without_privileged_text_or_answer_is_one_line(builtin_opsd, tmp_path, capsys):
    student = run_info(builtin_opsd)["student"]
    prompts = write_prompts(tmp_path / "p.jsonl", None, answers=True, missing_at=7)
    out = tmp_path / "run"
    assert main(["distill", "--method", "opsd", "--student", student, "--prompts", str(prompts),
                 "--out", str(out), *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert str(prompts) in err and "1 of 20 records" in err and "'privileged'" in err
    assert not (out / "metrics.jsonl").exists()
    # The same file trains with opd (answers are optional there).
    assert main(["distill", "--method", "opd", "--student", student, "--teacher", student, "--prompts", str(prompts),
                 "--out", str(tmp_path / "opd"), *SMALL, "--steps", "1"]) == 0


def test_opsd_refuses_a_vision_language_pair(tmp_path, capsys):
    assert main(["distill", "--method", "opsd", "--pair", "shapes-vlm-tiny", "--out", str(tmp_path / "run"),
                 *SMALL]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "opsd" in err and "vision-language" in err

