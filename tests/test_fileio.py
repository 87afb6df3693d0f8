"""jsae.fileio: a file or folder appears whole or not at all, and a failed write leaves nothing."""

from __future__ import annotations

import numpy as np
import pytest

from jsae import fileio, outputs


def _listing(d):
    """The entries of ``d`` but jsae.outputs' marker of what jsae wrote there."""
    return sorted(p.name for p in d.iterdir() if p.name != outputs.MARKER)


def test_file_replaced_whole_or_kept(tmp_path):
    f = tmp_path / "sub" / "a.json"
    fileio.write_text(f, "one")
    assert f.read_text() == "one"
    with pytest.raises(RuntimeError), fileio.atomic_file(f) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert f.read_text() == "one" and _listing(f.parent) == ["a.json"]  # old kept, no temporary
    fileio.write_bytes(f, b"two")
    assert f.read_bytes() == b"two" and _listing(f.parent) == ["a.json"]


def test_npz_through_an_open_file_keeps_any_name(tmp_path):
    f = tmp_path / "state.bin"  # np.savez(name) would have written state.bin.npz
    with fileio.atomic_file(f) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, x=np.arange(3))
    with np.load(f) as d:
        np.testing.assert_array_equal(d["x"], np.arange(3))
    assert _listing(tmp_path) == ["state.bin"]


def test_folder_replaces_an_older_one_and_cleans_up(tmp_path):
    d = tmp_path / "sae"
    with fileio.atomic_folder(d) as tmp:
        (tmp / "w").write_text("1")
    assert (d / "w").read_text() == "1"
    assert oct(d.stat().st_mode & 0o777) != oct(0o700)  # not mkdtemp's private mode
    with fileio.atomic_folder(d) as tmp:
        (tmp / "w2").write_text("2")
    assert _listing(d) == ["w2"] and _listing(tmp_path) == ["sae"]
    with pytest.raises(KeyboardInterrupt), fileio.atomic_folder(d) as tmp:
        (tmp / "partial").write_text("x")
        raise KeyboardInterrupt
    assert _listing(d) == ["w2"] and _listing(tmp_path) == ["sae"]


def test_folder_replace_keeps_files_it_did_not_write(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    (d / "notes.txt").write_text("the user's")
    (d / "sub").mkdir()
    (d / "sub" / "keep.js").write_text("the user's too")
    with fileio.atomic_folder(d, owner="jsae export") as tmp:
        (tmp / "a").write_text("1")
        (tmp / "b").write_text("1")
    assert _listing(d) == ["a", "b", "notes.txt", "sub"]
    assert outputs.marked_files(d, "jsae export") == ["a", "b"]
    with fileio.atomic_folder(d, owner="jsae export") as tmp:  # b no longer written: removed
        (tmp / "a").write_text("2")
    assert _listing(d) == ["a", "notes.txt", "sub"] and (d / "a").read_text() == "2"
    assert (d / "notes.txt").read_text() == "the user's" and (d / "sub" / "keep.js").exists()
    with pytest.raises(FileExistsError), fileio.atomic_folder(d, owner="jsae export") as tmp:
        (tmp / "sub").mkdir()  # a folder of the user's is never replaced
    assert (d / "sub" / "keep.js").exists() and _listing(tmp_path) == ["out"]


def test_folder_without_replace_keeps_a_whole_concurrent_result(tmp_path):
    d = tmp_path / "entry"
    d.mkdir()
    (d / "done").write_text("theirs")
    with fileio.atomic_folder(d, replace=False, keep_existing=lambda p: (p / "done").exists()) as tmp:
        (tmp / "done").write_text("mine")
    assert (d / "done").read_text() == "theirs" and _listing(tmp_path) == ["entry"]
    (d / "done").unlink()
    (d / "junk").write_text("?")
    with pytest.raises(OSError), fileio.atomic_folder(
            d, replace=False, keep_existing=lambda p: (p / "done").exists()) as tmp:
        (tmp / "done").write_text("mine")
    assert _listing(tmp_path) == ["entry"]
