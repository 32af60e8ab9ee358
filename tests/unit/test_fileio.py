"""Atomic writes leave either the old or the new content, never a mix."""

from __future__ import annotations

import json

import pytest

from opdlab import fileio
from opdlab.errors import UserError


def test_atomic_file_write_replaces_and_leaves_no_temporaries(tmp_path):
    target = tmp_path / "a.json"
    fileio.write_json(target, {"x": 1, "bad": float("nan")})
    fileio.write_json(target, {"x": 2})
    assert json.loads(target.read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    fileio.write_json(target, {"v": float("inf")})
    assert json.loads(target.read_text()) == {"v": None}


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "a.txt"
    fileio.write_text(target, "old")
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_atomic_folder_write_swaps_whole_folder(tmp_path):
    target = tmp_path / "ckpt"
    for version in ("1", "2"):
        with fileio.atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "w.txt").write_text(version)
            if version == "1":
                (tmp / "only-in-1.txt").write_text("")
    assert sorted(p.name for p in target.iterdir()) == ["w.txt"]
    assert (target / "w.txt").read_text() == "2"


def test_jsonl_ignores_a_torn_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    fileio.append_jsonl(path, {"step": 1})
    fileio.append_jsonl(path, {"step": 2})
    with open(path, "a") as fh:
        fh.write('{"step": 3, "tr')
    assert fileio.read_jsonl(path) == [{"step": 1}, {"step": 2}]


def test_prepare_out_dir_refuses_non_empty_without_overwrite(tmp_path):
    out = fileio.prepare_out_dir(tmp_path / "out", overwrite=False)
    (out / "result.txt").write_text("x")
    with pytest.raises(UserError, match="--overwrite"):
        fileio.prepare_out_dir(out, overwrite=False)
    assert fileio.prepare_out_dir(out, overwrite=True) == out
    assert [p.name for p in out.iterdir()] == [fileio.OUTPUT_MARKER]


def test_overwrite_never_deletes_a_folder_opdlab_did_not_write(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(UserError, match="only replaces folders opdlab wrote"):
        fileio.prepare_out_dir(home, overwrite=True)
    assert (home / "thesis.tex").read_text() == "years of work"
