"""cryptsnap.overlay.drop, the retention of history kept as overlay layers (docs/performance.md,
"History as overlay layers instead"), cut short at every step it takes and then finished, on a
btrfs made and mounted as cryptsnap does, with the kernel's overlayfs writing the layers;
dropping the oldest state (a merge into layer 0) and one with another below it. At every cut
each listed state reads as it did (but for the times of the directories being merged), the
dropped one too while it is listed; finished, the lower layer holds what both held, every kept
state exactly as before. A btrfs transaction holds every change made before its commit, so a
power cut leaves one of these cuts."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import subprocess
from pathlib import Path

import pytest

from cryptsnap import overlay
from tests.support import loopfs

CHANGING = ("rename", "unlink", "rmdir", "mkdir", "chmod", "chown", "utime", "setxattr", "removexattr")


class Cut(Exception):
    pass


@contextlib.contextmanager
def cut_after(steps: int):
    """os's calls that change a file system (shutil's and pathlib's go through them) raise Cut
    once STEPS of them have run; yields the count of those that ran."""
    done = [0]
    real = {name: getattr(os, name) for name in CHANGING}

    def counted(name):
        def call(*args, **kwargs):
            if done[0] >= steps:
                raise Cut(name)
            done[0] += 1
            return real[name](*args, **kwargs)

        return call

    for name in CHANGING:
        setattr(os, name, counted(name))
    try:
        yield done
    finally:
        for name, function in real.items():
            setattr(os, name, function)


def described(root: Path, directory_times: bool = True) -> dict[str, tuple]:
    """Every entry under ROOT with its type, mode, owner, size, content, link, device,
    extended attributes and modification time (of directories too, unless told not to)."""
    tree = {}
    for where, dirs, files in os.walk(root):
        for name in ["", *dirs, *files]:
            path = Path(where, name)
            if name == "" and path != root:
                continue
            st = path.lstat()
            is_dir = stat.S_ISDIR(st.st_mode)
            content = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            link = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
            xattrs = sorted(overlay.own_xattrs(path).items()) if not stat.S_ISLNK(st.st_mode) else []
            mtime = st.st_mtime_ns if directory_times or not is_dir else None
            tree[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, None if is_dir else st.st_size,
                                                 content, link, st.st_rdev, xattrs, mtime)  # fmt: skip
    return tree


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@contextlib.contextmanager
def writable(layers: Path, work: Path, merged: Path, n: int):
    with overlay.writable(layers, n, work, merged) as root:
        yield root
    overlay.write_names(layers, [*overlay.read_names(layers), (n, f"s{n}")])


def make_layers(layers: Path, work: Path, merged: Path) -> None:
    """Layer 0 a tree; layer 1 every kind of change overlayfs writes (changed and new files,
    whiteouts of files and directories, an opaque directory, a file become a directory and a
    directory become a file, a copied-up directory with a new owner, mode and ACL, an
    attribute removed); layer 2 changes on top of those, some of which hide names layer 0
    still holds; layer 3 one more, to read a state above the merged ones."""
    base = layers / "0"
    base.mkdir(parents=True)
    overlay.write_names(layers, [(0, "s0")])
    for name in ("a", "b", "c", "d/x", "d/y", "d/sub/z", "e/old", "f", "g/inner", "owned/k", "deep/p/q/r",
                 "h/one", "h/two", "only0"):  # fmt: skip
        write(base / name, f"{name} v0\n")
    os.symlink("a", base / "link")
    os.setxattr(base / "c", "user.note", b"kept until run 1")
    for n, path in enumerate(sorted(base.rglob("*"))):  # times that differ, as a real tree's do
        os.utime(path, ns=(10**18 + n, 10**18 + n * 10**9), follow_symlinks=False)
    with writable(layers, work, merged, 1) as root:
        write(root / "a", "a v1\n")
        (root / "b").unlink()
        write(root / "new/n", "n v1\n")
        subprocess.run(["rm", "-r", str(root / "e")], check=True)
        write(root / "e/fresh", "fresh v1\n")  # e is opaque now: old is gone below it
        os.removexattr(root / "c", "user.note")
        write(root / "d/x", "x v1\n")
        subprocess.run(["rm", "-r", str(root / "d/sub")], check=True)
        (root / "f").unlink()
        write(root / "f/now-a-dir", "f v1\n")
        subprocess.run(["rm", "-r", str(root / "g")], check=True)
        write(root / "g", "g v1, a file\n")
        os.chown(root / "owned", 1000, 1000)
        os.chmod(root / "owned", 0o750)
        subprocess.run(["setfacl", "-m", "u:1234:rx", str(root / "owned")], check=True)
        write(root / "deep/p/q/s", "s v1\n")
        os.utime(root / "deep/p", ns=(5 * 10**17, 5 * 10**17))
    with writable(layers, work, merged, 2) as root:
        write(root / "a", "a v2\n")
        (root / "new/n").unlink()  # only layer 1 has it
        (root / "only0").unlink()  # layer 0 has it: a merge into layer 1 keeps the whiteout
        write(root / "d/y", "y v2\n")
        subprocess.run(["rm", "-r", str(root / "h")], check=True)
        write(root / "h/three", "three v2\n")  # opaque over layer 0's h
        os.chmod(root / "deep/p/q", 0o700)
    with writable(layers, work, merged, 3) as root:
        write(root / "d/x", "x v3\n")
        write(root / "h/four", "four v3\n")


@pytest.mark.parametrize("dropped", [0, 1], ids=["the oldest state", "a state above another"])
def test_a_drop_cut_at_every_step_keeps_what_the_states_show_and_finishes_when_run_again(tmp_path, dropped):
    fs = tmp_path / "fs"
    with loopfs.btrfs(tmp_path / "image", fs):
        layers, work, merged, where = fs / "layers", fs / "work", tmp_path / "merged", tmp_path / "ro"
        make_layers(layers, work, merged)
        names = [f"s{n}" for n in range(4)]
        kept = [name for name in names if name != f"s{dropped}"]
        states = {}
        for name in names:
            with overlay.view(layers, name, where) as root:
                states[name] = described(root)
        assert states["s1"]["owned"][1:3] == (1000, 1000) and "e/old" not in states["s1"] and "b" not in states["s1"]
        assert "g/inner" not in states["s1"] and states["s1"]["g"][0] & stat.S_IFREG and "f/now-a-dir" in states["s1"]
        assert "only0" not in states["s2"] and "h/one" not in states["s3"] and "h/four" in states["s3"]

        steps, finished = 0, False
        while not finished:
            copy = fs / f"cut{steps}"
            subprocess.run(["cp", "-a", str(layers), str(copy)], check=True)
            with cut_after(steps) as done:
                try:
                    overlay.drop(copy, f"s{dropped}")
                    finished = True
                except Cut:
                    assert done[0] == steps
            if not finished:
                listed = [name for _, name in overlay.read_names(copy)]
                assert listed in (names, kept), f"cut after {steps} steps: {listed}"
                for name in listed:  # as the drop left the layers at the cut
                    with overlay.view(copy, name, where) as root:
                        seen = described(root, directory_times=False)
                    assert seen == described_without_directory_times(states[name]), f"cut after {steps} steps, {name}"
                overlay.finish(copy)  # as the next run does first, then retention again
                if f"s{dropped}" in [name for _, name in overlay.read_names(copy)]:
                    overlay.drop(copy, f"s{dropped}")
            assert [name for _, name in overlay.read_names(copy)] == kept
            assert overlay.stack(copy) == [n for n in (3, 2, 1, 0) if n != dropped + 1]
            for name in kept:  # the directories' times too: the merge took them from its plan
                with overlay.view(copy, name, where) as root:
                    assert described(root) == states[name], f"cut after {steps} steps, then run again: {name}"
            assert not [p for p in copy.iterdir() if p.name.startswith(overlay.PLAN_PREFIX)], "the plan is removed"
            if dropped == 0:
                assert not markers(copy / "0"), f"overlayfs's markers left in layer 0 (cut after {steps} steps)"
            subprocess.run(["rm", "-rf", str(copy)], check=True)
            steps += 1
        assert steps > 30, "every step of the drop was cut once"


def test_the_newest_state_is_not_dropped_and_an_unknown_name_is_said(tmp_path):
    fs = tmp_path / "fs"
    with loopfs.btrfs(tmp_path / "image", fs):
        layers = fs / "layers"
        make_layers(layers, fs / "work", tmp_path / "merged")
        with pytest.raises(ValueError, match="s3 is the newest state"):
            overlay.drop(layers, "s3")
        with pytest.raises(KeyError):
            overlay.drop(layers, "s9")
        assert [name for _, name in overlay.read_names(layers)] == ["s0", "s1", "s2", "s3"]


def described_without_directory_times(tree: dict[str, tuple]) -> dict[str, tuple]:
    return {path: (*entry[:8], None if entry[3] is None else entry[8]) for path, entry in tree.items()}


def markers(root: Path) -> list[str]:
    """Whiteouts and overlayfs's attributes under ROOT: the bottom layer, a tree of its own."""
    found = []
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            found.append(f"{path}: a whiteout")
        elif not stat.S_ISLNK(st.st_mode):
            names = os.listxattr(path, follow_symlinks=False)
            found += [f"{path}: {name}" for name in names if name.encode().startswith(overlay.OVERLAY_XATTRS)]
    return found
