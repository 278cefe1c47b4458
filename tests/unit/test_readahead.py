"""Reading a restore's small files ahead of rsync (cryptsnap.readahead), on a local tree.

Behind a link's latency it is measured by bench/readahead_lab.py (tests/host/test_bench_labs.py
runs it small); here: rsync's order, the window and the stop.
"""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

from cryptsnap.readahead import ReadAhead, copy_out, in_rsync_order


def rsync_order(top: Path, tmp: Path) -> list[str]:
    """The regular files rsync copies, in its order (what it names in a dry run)."""
    out = subprocess.run(["rsync", "-a", "-n", "--out-format=%n", f"{top}/", f"{tmp}/nowhere/"],
                         capture_output=True, text=True, check=True).stdout.split("\n")  # fmt: skip
    return [name for name in out if name and (top / name).is_file() and not (top / name).is_symlink()]


def tree_of(top: Path, names: list[str], size: int = 1000) -> None:
    for name in names:
        (top / name).parent.mkdir(parents=True, exist_ok=True)
        (top / name).write_bytes(b"x" * size)


def until(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out: {condition.__code__.co_consts}"
        time.sleep(0.01)


def test_the_files_come_in_rsync_order(tmp_path):
    top = tmp_path / "tree"
    tree_of(top, [f"{d}/{f}" for d in ("", "a", "a/x", "a.b", "a-b", "B", "ab", "a/x/y") for f in ("f", "F", "f.txt", "é")])
    (top / "link").symlink_to("f")
    os.mkfifo(top / "a" / "fifo")
    ours = [os.path.relpath(path, top) for path in in_rsync_order(top)]
    assert ours == rsync_order(top, tmp_path) and "a.b/f" in ours


def finished(ahead: ReadAhead) -> bool:
    return not any(thread.is_alive() for thread in ahead._threads)


def test_a_file_with_several_names_is_read_once(tmp_path):
    tree_of(tmp_path, ["a/one", "z"])
    os.link(tmp_path / "a" / "one", tmp_path / "two")
    with ReadAhead(tmp_path, threads=4) as ahead:  # rsync's order: two, z, a/one (two's second name)
        until(lambda: finished(ahead))
    assert (ahead.figures.files, ahead.figures.bytes, ahead.figures.most_ahead) == (2, 2000, 2000)


def test_a_file_gone_since_the_walk_holds_up_nothing(tmp_path):
    tree_of(tmp_path, [f"f{n:02}" for n in range(10)], size=1000)
    with ReadAhead(tmp_path, threads=1, window=1000) as ahead:
        until(lambda: ahead.figures.files == 2)  # f00, f01; f02 (at 2000) stated, waiting
        (tmp_path / "f03").unlink()  # listed by the walk already
        ahead.copied(2000)
        until(lambda: ahead.figures.files == 4)  # f02, then f04 at 3000: f03 counted as nothing
        time.sleep(0.3)
        assert (ahead.figures.files, ahead.figures.most_ahead) == (4, 2000)  # f05 at 4000 waits
        ahead.copied(20_000)
        until(lambda: finished(ahead))
    assert (ahead.figures.files, ahead.figures.skipped) == (4, 5)


def test_the_reading_stays_within_the_window_of_what_rsync_copied(tmp_path):
    tree_of(tmp_path, [f"d/f{n:02}" for n in range(30)], size=1000)
    tree_of(tmp_path, ["d/g-large"], size=5000)  # larger than `small`: not read, but counted
    with ReadAhead(tmp_path, threads=4, window=3000, small=2000) as ahead:
        until(lambda: ahead.figures.files == 4)  # files starting at 0, 1000, 2000, 3000
        time.sleep(0.3)
        assert ahead.figures.files == 4 and ahead.figures.most_ahead == 4000
        ahead.copied(5000)  # file 4 (4000-5000), waiting for its turn, is copied now: skipped
        until(lambda: ahead.figures.files == 8)
        ahead.copied(20_000)  # rsync got past files 9-19 before they were read: skipped
        until(lambda: ahead.figures.files == 12)  # and 20-23 read, within 3000 of 20,000
        time.sleep(0.3)
        assert (ahead.figures.files, ahead.figures.skipped) == (12, 12)
        ahead.copied(35_000)  # past the rest
        until(lambda: ahead.figures.skipped == 18)
    assert (ahead.figures.files, ahead.figures.skipped, ahead.figures.bytes) == (12, 18, 12_000)


def regular(size: int, inode: int = 0, names: int = 1) -> os.stat_result:
    return os.stat_result((stat.S_IFREG | 0o644, inode, 1, names, 0, 0, size, 0, 0, 0))


def test_where_a_file_starts_waits_for_every_file_before_it():
    """The threads stat their files in any order; a file's place against the window is known
    only once every file before it in rsync's order has been stated."""
    ahead = ReadAhead(None, threads=0, window=1500, small=2000)
    assert ahead._stated(1, regular(1000))  # the second file, stated first
    assert not ahead._within(1)  # it starts after the first, of a size not known yet
    ahead._stated(3, regular(1000))
    ahead._stated(0, regular(1000))
    assert ahead._within(1) and ahead._starts[1] == 1000 and not ahead._within(3)
    assert not ahead._stated(2, regular(5000))  # too large to read ahead: counted, not read
    assert ahead._starts[3] == 7000 and not ahead._within(3)  # 7000 - 0 > 1500
    ahead.copied(5500)
    assert ahead._within(3)
    ahead._stated(4, None)  # could not be opened: counts as nothing
    ahead._stated(5, regular(1000, inode=9, names=2))
    ahead._stated(6, regular(1000, inode=9, names=2))  # a second name of file 5: rsync copies it once
    ahead._stated(7, regular(1000))
    assert (ahead._starts[5], 6 in ahead._starts, ahead._starts[7]) == (8000, False, 9000)


def test_leaving_stops_threads_waiting_for_rsync(tmp_path):
    tree_of(tmp_path, [f"f{n}" for n in range(10)])
    ahead = ReadAhead(tmp_path, threads=3, window=0)
    with ahead:
        until(lambda: ahead.figures.files == 1)
    assert finished(ahead)


def test_copy_out_copies_a_tree_and_a_single_file(tmp_path):
    source = tmp_path / "source"
    tree_of(source, [f"d{n % 7}/f{n}" for n in range(200)], size=3000)
    (source / "d1" / "link").symlink_to("f1")
    figures = copy_out(source, str(tmp_path / "copy"))
    assert figures.files + figures.skipped == 200
    assert subprocess.run(["diff", "-r", "--no-dereference", str(source), str(tmp_path / "copy")]).returncode == 0
    copy_out(source / "d3" / "f3", str(tmp_path / "one"))
    assert (tmp_path / "one").read_bytes() == b"x" * 3000
