import io
import os
import shutil
from pathlib import Path

import pytest

from node import spool
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


def test_a_folder_another_thread_just_made_is_made_durable_before_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11, fault 11: a folder that exists (another association made it and has not yet fsynced
    its parent) is not taken as durable: its parent is fsynced before a file is acknowledged in it."""
    synced: list[Path] = []
    real = spool._fsync_dir
    monkeypatch.setattr(spool, "_fsync_dir", lambda path: (synced.append(path), real(path)))
    study = tmp_path / "incoming" / "1.2.3"
    study.mkdir(parents=True)  # made by "another thread", its parent not fsynced
    spool.write_atomic(study / "1.2.3.4.dcm", b"data")
    assert tmp_path / "incoming" in synced  # the study folder's entry in its parent
    assert study in synced  # and the file's entry in the study folder
    synced.clear()
    spool.write_atomic(study / "1.2.3.5.dcm", b"data")
    assert synced == [study]  # once durable, a folder costs no more fsyncs


def test_a_durable_folder_removed_since_is_made_again(tmp_path: Path) -> None:
    results = tmp_path / "results" / "1"
    write_atomic(results / "a.dcm", b"first run")
    shutil.rmtree(results)  # a rerun clears its results folder
    write_atomic(results / "a.dcm", b"second run")
    assert (results / "a.dcm").read_bytes() == b"second run"


def test_a_staged_file_is_flushed_only_when_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12: a re-sent identical instance is staged, compared with the spool's and dropped; it was
    fsynced first, a full flush to disk for nothing. Now only a commit flushes it — before the rename,
    so the name never points at data not on disk — and then the rename."""
    flushed: list[str] = []
    real = os.fsync
    monkeypatch.setattr(
        os, "fsync", lambda fd: (flushed.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd))[1]
    )
    target = tmp_path / "study" / "1.2.3.dcm"
    with spool.staged(target, b"head", io.BytesIO(b"body")) as dropped:
        assert str(dropped.temp) not in flushed
    assert not dropped.temp.exists()
    with spool.staged(target, b"head", io.BytesIO(b"body")) as kept:
        flushed.clear()
        kept.commit()
    assert flushed == [str(kept.temp), str(target.parent)]
    assert target.read_bytes() == b"headbody"


def test_an_adopted_file_is_renamed_whole_or_removed(tmp_path: Path) -> None:
    """The listener's received file becomes the spool file as it is (one write); uncommitted, it goes."""
    target = tmp_path / "incoming" / "1.2.3.dcm"
    for commit in (False, True):
        received = tmp_path / "receiving" / "tmp1.dcm"
        received.parent.mkdir(exist_ok=True)
        received.write_bytes(b"instance")
        inode = received.stat().st_ino
        with spool.adopted(target, received) as staged:
            if commit:
                staged.commit()
        assert not received.exists()
        assert target.exists() == commit
    assert target.stat().st_ino == inode and target.read_bytes() == b"instance"
