"""paths.staged / atomic_write: the one way the course writes files and folders."""

import os
import stat
from pathlib import Path

import pytest

from course_utils.paths import atomic_write, staged


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_staged_file_appears_only_when_the_block_succeeds(tmp_path):
    target = tmp_path / "a.txt"
    with pytest.raises(RuntimeError):
        with staged(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert not target.exists() and leftovers(tmp_path) == []
    with staged(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and leftovers(tmp_path) == []
    assert stat.S_IMODE(target.stat().st_mode) & 0o044  # readable like any other file, not 0600


def test_existing_outputs_are_never_replaced_silently(tmp_path):
    target = atomic_write(tmp_path / "a.txt", "old")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        atomic_write(target, "new")
    assert target.read_text() == "old"
    with pytest.raises(ValueError):
        with staged(target, overwrite=True) as tmp:
            tmp.write_text("new")
            raise ValueError("failed")
    assert target.read_text() == "old" and leftovers(tmp_path) == []
    atomic_write(target, b"new", overwrite=True)
    assert target.read_bytes() == b"new"


def test_a_staged_folder_replaces_a_filled_one_only_with_overwrite(tmp_path):
    target = tmp_path / "model"
    (target / "sub").mkdir(parents=True)
    (target / "old.bin").write_text("old")
    with pytest.raises(FileExistsError):
        with staged(target, folder=True):
            pass
    with staged(target, overwrite=True, folder=True) as tmp:
        (tmp / "new.bin").write_text("new")
    assert sorted(os.listdir(target)) == ["new.bin"] and leftovers(tmp_path) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with staged(empty, folder=True) as tmp:  # an empty folder is not an output to protect
        (tmp / "x").write_text("x")
    assert (empty / "x").exists()


def test_a_failed_swap_keeps_the_old_folder(tmp_path, monkeypatch):
    """The old folder is moved aside, not deleted, until the new one is in place: a failure between the
    two steps leaves the old one where it was, and nothing hidden behind."""
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "weights").write_text("old")
    real_replace, failed = os.replace, []

    def failing_second_move(src, dst):  # the new folder's move into place fails, once
        if Path(dst) == target and not failed:
            failed.append(src)
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_second_move)
    with pytest.raises(OSError, match="disk full"):
        with staged(target, overwrite=True, folder=True) as tmp:
            (tmp / "weights").write_text("new")
    assert (target / "weights").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_the_course_is_found_from_the_package_outside_any_checkout(tmp_path):
    from course_utils.paths import PACKAGE_CHECKOUT, course_root

    assert course_root(tmp_path) == PACKAGE_CHECKOUT  # Colab's /content, a copied notebook's folder
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "course_utils").mkdir()
    assert course_root(tmp_path / "notebooks") == tmp_path  # inside a checkout: that checkout
