"""Atomic outputs: complete or absent, with the modes the umask asks for."""

import os
import stat

import pytest

from analogllm.fileio import atomic_dir, atomic_write_bytes


def test_failed_write_leaves_neither_a_folder_nor_a_temporary(tmp_path):
    target = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_bytes(b"half")
            raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_is_replaced_only_when_the_new_one_is_complete(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("new")
            raise KeyboardInterrupt
    assert (target / "a").read_text() == "old"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("new")
    assert (target / "a").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_cache_mode_keeps_what_another_process_finished_first(tmp_path):
    target = tmp_path / "cache"
    with atomic_dir(target, keep_existing=True) as tmp:
        (tmp / "x").write_text("first")
    with atomic_dir(target, keep_existing=True) as tmp:
        (tmp / "x").write_text("second")
    assert (target / "x").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_outputs_get_the_umask_modes_not_the_private_temporary_ones(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "d"):
            pass
        atomic_write_bytes(tmp_path / "f", b"data")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o644
    assert (tmp_path / "f").read_bytes() == b"data"
