"""Atomic writes: the file appears whole or not at all, and the writer sees the target's suffix."""

import pytest

from lamda_edge.atomic import write_atomic, write_bytes_atomic


def test_writes_whole_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "metrics.json"
    write_bytes_atomic(target, b'{"a": 1}')
    write_bytes_atomic(target, b'{"a": 2}')
    assert target.read_bytes() == b'{"a": 2}'
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_temporary_name_keeps_the_suffix(tmp_path):
    seen = []
    write_atomic(tmp_path / "loss_curve.png", lambda tmp: (seen.append(tmp), open(tmp, "wb").write(b"x")))
    assert seen[0].endswith(".png")


def test_a_failing_writer_keeps_the_old_file(tmp_path):
    target = tmp_path / "adapter_config.json"
    target.write_text("old")

    def broken(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        write_atomic(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter_config.json"]
