"""Atomic writes: a failure leaves the previous file or directory whole and no temp behind."""

import pytest

from nemo_controlnet.io import atomic_dir, atomic_path, write_json_atomic


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name != target.name  # same filesystem, other name
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"


def test_atomic_dir_swaps_whole_directories(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("failed export")
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic_dir(target) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    write_json_atomic(tmp_path / "m.json", {"b": 1})
    assert (tmp_path / "m.json").read_text() == '{\n  "b": 1\n}\n'
