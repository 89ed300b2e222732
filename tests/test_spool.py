import os
from pathlib import Path

import pytest

from node.spool import InvalidUID, Spool, check_uid, write_atomic


@pytest.mark.parametrize(
    "uid", ["", "1.2.03", "../../etc/passwd", "1.2.3/4", "1." * 40 + "1", "1.2.3.", "abc"]
)
def test_bad_uids_never_become_paths(tmp_path: Path, uid: str) -> None:
    with pytest.raises(InvalidUID):
        Spool(tmp_path).instance_path(uid, "1.2", "1.3")


def test_good_uid() -> None:
    assert check_uid(" 1.2.840.10008.5.1.4.1.1.2 ") == "1.2.840.10008.5.1.4.1.1.2"


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b.dcm"
    write_atomic(target, b"first")
    write_atomic(target, b"second version")
    assert target.read_bytes() == b"second version"
    assert os.listdir(target.parent) == ["b.dcm"]


def test_failed_write_leaves_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "x.dcm"
    write_atomic(target, b"good")

    with pytest.raises(TypeError):
        write_atomic(target, object())  # type: ignore[arg-type]
    assert target.read_bytes() == b"good"
    assert os.listdir(tmp_path) == ["x.dcm"]
