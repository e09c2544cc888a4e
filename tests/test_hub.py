"""hub.py: staged folders are swapped in whole, interrupted swaps are recovered, offline uploads fail fast."""

from __future__ import annotations

import json
import os
import time

import pytest

from visualad_hf.hub import (
    HubUploadError,
    push_folder,
    recover_interrupted_swap,
    remove_stale_staging,
    staged_folder,
    write_json,
)


def _write(folder, **files):
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_staged_folder_replaces_the_target_as_a_whole(tmp_path):
    target = tmp_path / "model"
    _write(target, **{"README.md": "old", "model.safetensors": "old weights", "stale.txt": "only in the old one"})
    with staged_folder(target) as staging:
        assert staging.parent == tmp_path and not any(staging.iterdir())
        _write(staging, **{"README.md": "new", "model.safetensors": "new weights"})
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "model.safetensors"]
    assert (target / "README.md").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or .old left behind


def test_an_error_while_staging_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "model"
    _write(target, **{"README.md": "old"})
    with pytest.raises(OSError, match="No space left"), staged_folder(target) as staging:
        _write(staging, **{"README.md": "half"})
        raise OSError(28, "No space left on device")
    assert (target / "README.md").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_kill_between_the_renames_restores_the_old_folder(tmp_path):
    target = tmp_path / "model"
    _write(tmp_path / "model.old", **{"README.md": "old"})  # what a kill after the first rename leaves
    assert "restored" in recover_interrupted_swap(target)
    assert (target / "README.md").read_text() == "old" and not (tmp_path / "model.old").exists()
    _write(tmp_path / "model.old", **{"README.md": "older"})  # a kill after the second rename: new one in place
    assert "removed" in recover_interrupted_swap(target)
    assert (target / "README.md").read_text() == "old" and not (tmp_path / "model.old").exists()
    assert recover_interrupted_swap(target) is None


def test_stale_staging_folders_are_removed(tmp_path):
    (tmp_path / ".model.1234abcd.tmp").mkdir()
    (tmp_path / "model").mkdir()
    assert [p.name for p in remove_stale_staging(tmp_path)] == [".model.1234abcd.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_write_json_is_atomic_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "results.json"
    write_json(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    with pytest.raises(TypeError):
        write_json(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}  # the failed write changed nothing
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_push_folder_offline_fails_at_once_with_the_upload_command(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(HubUploadError) as info:
        push_folder(tmp_path, "org/model")
    assert time.monotonic() - start < 5
    assert f"hf upload org/model {tmp_path}" in str(info.value) and os.fspath(tmp_path) in str(info.value)
