"""Atomic file output."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from explora_geo.atomic import atomic_paths, write_text_atomic


def test_targets_appear_together_with_normal_permissions(tmp_path: Path) -> None:
    a, b = tmp_path / "sub" / "w.bin", tmp_path / "sub" / "w.json"
    with atomic_paths(a, b) as (ta, tb):
        assert ta.parent == a.parent and ta.suffix == ".bin" and tb.suffix == ".json"
        ta.write_bytes(b"123")
        tb.write_text("{}")
        assert not a.exists() and not b.exists()
    assert a.read_bytes() == b"123" and b.read_text() == "{}"
    assert sorted(p.name for p in a.parent.iterdir()) == ["w.bin", "w.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(a.stat().st_mode) == 0o666 & ~umask


def test_failure_keeps_old_content_and_leaves_no_temporaries(tmp_path: Path) -> None:
    target = write_text_atomic(tmp_path / "stats.json", "old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_paths(target) as (tmp,):
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["stats.json"]
