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


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=["022", "077", "002"])
def test_files_follow_the_umask(tmp_path, umask):
    """As `open()` and the Trainer's files do (mkstemp's 0600 made adapter files unreadable to the group)."""
    import os

    old = os.umask(umask)
    try:
        write_bytes_atomic(tmp_path / "metrics.json", b"{}")

        def replace_file(tmp):  # as safetensors' writer does: a new file, with a mode of its own
            os.unlink(tmp)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))

        write_atomic(tmp_path / "adapter.safetensors", replace_file)
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["metrics.json", "adapter.safetensors", "plain.txt"], 0o666 & ~umask)
