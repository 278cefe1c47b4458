"""history: layers in the guest, with dm-crypt and the block device server: init, backups, list,
restore of each state, `cryptsnap mount`, check, prune by merging, a run killed while rsync
writes through the overlay, and docs/restore-by-hand.md's layered block with stock tools."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.support import docs, trees
from tests.support.checks import assert_nothing_left, cryptsnap
from tests.support.targets import init_target, make_setup


def restored(setup, tmp_path: Path, name: str) -> dict:
    dest = tmp_path / f"restored-{name}"
    cryptsnap(setup, "restore", f"{setup.name}@{name}:{setup.source}", "--to", str(dest))
    return trees.manifest(dest)


def test_a_layered_image_keeps_each_state_restores_it_and_merges_for_retention(tmp_path, untrusted_host):
    setup = make_setup(tmp_path, untrusted_host, history="layers", size="200M")
    trees.build(setup.source)
    init_target(setup)
    wanted = {}
    for change in (None, trees.mutate, lambda root: (root / "docs" / "a.txt").write_text("third run\n")):
        if change:
            change(setup.source)
        out = cryptsnap(setup, "backup", setup.name).stdout
        wanted[out.split("snapshot ")[1].split()[0]] = trees.manifest(setup.source)
    names = cryptsnap(setup, "list", setup.name).stdout.split()
    assert names == list(wanted)
    for name in names:
        assert restored(setup, tmp_path, name) == wanted[name], name

    cryptsnap(setup, "mount", setup.name)  # each state at snapshots/NAME, as with snapshots
    try:
        view = setup.runtime_dir / "restore" / setup.name
        assert sorted(os.listdir(view / "snapshots")) == names
        assert sorted(os.listdir(view / "layers")) == ["0", "1", "2", "names", "work"]
        for name in names:
            shown = view / "snapshots" / name / str(setup.source).lstrip("/")
            assert trees.across_file_systems(trees.manifest(shown)) == trees.across_file_systems(wanted[name]), name
    finally:
        cryptsnap(setup, "umount", setup.name)
    assert_nothing_left(setup)
    # Every file of the newest state read back (the output names files: bytes, not all UTF-8).
    checked = subprocess.run(["python3", "-m", "cryptsnap", *setup.cli_args("check", setup.name, "--fraction", "1")],
                             capture_output=True, timeout=900)  # fmt: skip
    said = checked.stdout.decode(errors="replace") + checked.stderr.decode(errors="replace")
    assert checked.returncode == 0 and f"snapshot {names[-1]}: read " in said, said

    document = yaml.safe_load(setup.config_path.read_text())
    document["targets"][setup.name]["retention"] = {"last": 1, "daily": 0, "weekly": 0, "monthly": 0}
    setup.config_path.write_text(yaml.safe_dump(document))
    cryptsnap(setup, "prune", setup.name)
    assert cryptsnap(setup, "list", setup.name).stdout.split() == names[-1:]
    document["targets"][setup.name]["history"] = "snapshots"  # an image keeps what init made it with
    setup.config_path.write_text(yaml.safe_dump(document))
    said = cryptsnap(setup, "backup", setup.name).stderr
    assert "history: snapshots is set, but the image keeps its history as layers" in said, said
    names = cryptsnap(setup, "list", setup.name).stdout.split()  # the newest kept, the one before dropped
    assert len(names) == 1 and names[0] > max(wanted)
    wanted[names[0]] = trees.manifest(setup.source)
    assert restored(setup, tmp_path, names[0]) == wanted[names[0]]
    assert_nothing_left(setup)

    image = (Path(untrusted_host.remote_dir) / f"{setup.name}.img").read_bytes()
    assert trees.MARKER.encode() not in image and b"hard linked content" not in image


@pytest.mark.long  # 100 s of guest time; make test: the crashed run (snapshots), the overlay's leftovers on the host
def test_a_run_killed_while_it_writes_through_the_overlay_leaves_no_state_and_nothing_mounted(tmp_path,
                                                                                              untrusted_host):  # fmt: skip
    setup = make_setup(tmp_path, untrusted_host, history="layers", size="200M")
    (setup.source / "small").write_text("first\n")
    init_target(setup)
    first = cryptsnap(setup, "backup", setup.name).stdout.split("snapshot ")[1].split()[0]
    for i in range(3):
        (setup.source / f"big-{i}").write_bytes(os.urandom(16 << 20))
    proc = subprocess.Popen(["python3", "-m", "cryptsnap", *setup.cli_args("backup", setup.name)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    overlay = setup.runtime_dir / setup.name / "fs" / ".cryptsnap" / "overlay" / str(setup.source).lstrip("/")
    while not any(overlay.glob("big-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)  # rsync is writing through the overlay
    assert proc.poll() is None, proc.communicate()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert cryptsnap(setup, "list", setup.name).stdout.split() == [first]  # cleans up what the kill left
    assert_nothing_left(setup)
    # (Its layer is removed by the next run if a commit took it in: tests/host/test_layered.py.)
    second = cryptsnap(setup, "backup", setup.name).stdout.split("snapshot ")[1].split()[0]
    assert cryptsnap(setup, "list", setup.name).stdout.split() == [first, second]
    dest = tmp_path / "second"
    cryptsnap(setup, "restore", f"{setup.name}@{second}:{setup.source}", "--to", str(dest))
    assert trees.manifest(dest) == trees.manifest(setup.source)
    assert_nothing_left(setup)


@pytest.mark.long  # 70 s of guest time; make test restores layered images with cryptsnap (above)
def test_the_restore_by_hand_page_reads_a_layered_image_with_stock_tools(tmp_path, untrusted_host):
    setup = make_setup(tmp_path, untrusted_host, history="layers")
    wanted = setup.source / "by-hand.txt"
    init_target(setup)
    names = []
    for text in ("first state\n", "second state\n", "third state\n"):
        wanted.write_text(text)
        names.append(cryptsnap(setup, "backup", setup.name).stdout.split("snapshot ")[1].split()[0])
    target, server = setup.load(), setup.server
    copy = Path("/tmp") / wanted.name
    try:
        for name, text in zip(names, ("first state\n", "second state\n", "third state\n"), strict=True):
            script = docs.with_values(docs.block("restore-by-hand.md", "restore-by-hand-layers"), {
                "TARGET": setup.name, "REMOTE": f"{server.user}@{server.host}:{target.remote_dir}",
                "PORT": str(server.port), "SSH_KEY": str(server.identity),
                "KNOWN_HOSTS": str(setup.state_dir / setup.name / "known_hosts"), "IMAGE": target.image,
                "KEY": str(setup.key_file), "SNAPSHOT": name, "FILE": str(wanted),
            })  # fmt: skip
            copy.unlink(missing_ok=True)
            ran = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True,
                                 timeout=300)  # fmt: skip
            assert ran.returncode == 0, ran.stdout + ran.stderr
            assert names[0] in ran.stdout  # what `cat names` listed
            assert copy.read_text() == text, name
    finally:  # a failure halfway leaves what the page opened: close it as its last line would
        for argv in (["umount", "/mnt/state"], ["umount", "/mnt/backup"], ["cryptsetup", "close", "cryptsnap-restore"],
                     ["fusermount3", "-u", "/mnt/remote"]):  # fmt: skip
            subprocess.run(argv, capture_output=True)
        for loop in subprocess.run(["losetup", "--associated", f"/mnt/remote/{target.image}"], capture_output=True,
                                   text=True).stdout.splitlines():  # fmt: skip
            subprocess.run(["losetup", "--detach", loop.split(":")[0]], capture_output=True)
        copy.unlink(missing_ok=True)
    assert_nothing_left(setup)
