"""The one write-to-temp-then-rename helper (utils/files.py atomic_output / atomic_folder) and the writers built on
it: a write lands whole or not at all, a failure leaves what was there and no temp file."""

import hashlib
import multiprocessing
import os
import stat

import pytest

from datasets.cache import load_cached_split, save_split
from datasets.sources import download
from utils.errors import InputError, WriteError
from utils.files import atomic_folder, atomic_output


def leftovers(folder):
    """Hidden temp files or folders left beside the outputs."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_a_file_write_that_fails_midway_keeps_the_old_file_and_no_temp(tmp_path, error):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(type(error)):
        with atomic_output(path) as tmp:
            tmp.write_text("half of the new")
            raise error
    assert path.read_text() == "old" and leftovers(tmp_path) == []


def test_an_os_error_midway_is_a_write_error_naming_the_file(tmp_path):
    path = tmp_path / "out.json"
    with pytest.raises(WriteError, match=rf"could not write .*{path.name}.*\(nothing was left half written\)$"):
        with atomic_output(path) as tmp:
            tmp.write_text("x")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_a_file_lands_whole_with_mode_0644_and_a_folder_with_0755(tmp_path):
    with atomic_output(tmp_path / "a" / "out.txt") as tmp:
        tmp.write_text("new")
    with atomic_folder(tmp_path / "a" / "folder") as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "a" / "out.txt").read_text() == "new"
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "out.txt").st_mode) == 0o644  # mkstemp alone gives 0600
    assert stat.S_IMODE(os.stat(tmp_path / "a" / "folder").st_mode) == 0o755
    assert leftovers(tmp_path / "a") == []
    with pytest.raises(InputError, match="expected a file to write, found a folder"):
        with atomic_output(tmp_path / "a" / "folder"):
            pass


def test_a_folder_replaces_the_old_one_whole_and_a_failed_one_keeps_it(tmp_path):
    path = tmp_path / "eval"
    with atomic_folder(path) as tmp:
        (tmp / "old_only.json").write_text("1")
        (tmp / "both.json").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(path) as tmp:
            (tmp / "both.json").write_text("half")
            raise KeyboardInterrupt
    assert (path / "both.json").read_text() == "old" and leftovers(tmp_path) == []
    with atomic_folder(path) as tmp:
        (tmp / "both.json").write_text("new")
    assert sorted(p.name for p in path.iterdir()) == ["both.json"]  # no file of the earlier write survives
    assert (path / "both.json").read_text() == "new" and leftovers(tmp_path) == []


def test_a_folder_whose_final_rename_fails_is_put_back_whole(tmp_path, monkeypatch):
    """The old folder is moved aside before the new one goes in; when that last rename fails (a real failure of the
    file system, simulated here on os.replace), the old folder is put back and nothing is left beside it."""
    path = tmp_path / "eval"
    with atomic_folder(path) as tmp:
        (tmp / "result.json").write_text("old")
    real_replace, calls = os.replace, []

    def failing_replace(src, dst):
        calls.append((os.fspath(src), os.fspath(dst)))
        if os.fspath(dst) == os.fspath(path) and ".tmp" in os.fspath(src) and len(calls) > 1:
            raise OSError(5, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(WriteError, match="eval"):
        with atomic_folder(path) as tmp:
            (tmp / "result.json").write_text("new")
    assert len(calls) == 4  # tmp -> path (not empty), path -> aside, tmp -> path (fails), aside -> path
    assert (path / "result.json").read_text() == "old" and leftovers(tmp_path) == []


def test_a_folder_written_first_by_another_process_is_kept_when_asked(tmp_path):
    path = tmp_path / "cache"
    with atomic_folder(path, keep_existing=lambda p: (p / "done").is_file()) as tmp:
        (tmp / "done").write_text("mine")
        path.mkdir()  # meanwhile another process renames its own complete copy into place
        (path / "done").write_text("theirs")
    assert (path / "done").read_text() == "theirs" and leftovers(tmp_path) == []
    # an existing folder that the check rejects (an unreadable copy) is replaced
    with atomic_folder(path, keep_existing=lambda p: False) as tmp:
        (tmp / "done").write_text("mine")
    assert (path / "done").read_text() == "mine" and leftovers(tmp_path) == []


def _save(folder, split):
    save_split(folder, split, {})


def test_parallel_cache_writers_of_one_key_leave_one_whole_copy(tmp_path, tiny_split):
    """What parallel sweep trials preparing the same dataset do: every writer succeeds, no temp folder is left."""
    folder = tmp_path / "preprocessed" / "key"
    context = multiprocessing.get_context("fork")
    writers = [context.Process(target=_save, args=(folder, tiny_split)) for _ in range(4)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(timeout=60)
    assert [writer.exitcode for writer in writers] == [0, 0, 0, 0]
    assert load_cached_split(folder).train == tiny_split.train
    assert [p.name for p in folder.parent.iterdir()] == ["key"]
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755


def test_a_download_lands_only_when_its_sha256_matches(tmp_path):
    source = tmp_path / "remote.bin"
    source.write_bytes(b"published bytes")
    dest = tmp_path / "raw" / "ratings.csv"
    dest.parent.mkdir()
    dest.write_bytes(b"earlier")
    with pytest.raises(InputError, match="expected the published 0000"):
        download(source.as_uri(), dest, sha256="0" * 64)
    assert dest.read_bytes() == b"earlier" and leftovers(dest.parent) == []  # a bad download never lands
    with pytest.raises(InputError, match="download from .*absent.bin failed"):
        download((tmp_path / "absent.bin").as_uri(), dest)
    assert dest.read_bytes() == b"earlier" and leftovers(dest.parent) == []
    download(source.as_uri(), dest, sha256=hashlib.sha256(b"published bytes").hexdigest())
    assert dest.read_bytes() == b"published bytes" and leftovers(dest.parent) == []
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o644
