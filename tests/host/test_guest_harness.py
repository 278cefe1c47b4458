"""The guest harness itself, driven from the host: failures are loud, bounded and leave no qemu."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.harness.vm import Guest, GuestError

REPO = Path(__file__).resolve().parents[2]


def qemu_processes() -> list[psutil.Process]:
    return [p for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("qemu-system")]


def test_a_guest_that_panics_fails_fast_with_its_console_tail(tmp_path):
    started = time.monotonic()
    # init=/bin/false: the kernel boots, init exits, the kernel panics.
    guest = Guest(results=tmp_path / "results", kernel_extra=("init=/bin/false",), boot_timeout=240)
    with pytest.raises(GuestError) as failure:
        guest.start()
    message = str(failure.value)
    assert "guest console" in message
    assert "Kernel panic" in message or "qemu exited" in message
    assert time.monotonic() - started < 240
    assert not [p for p in qemu_processes() if str(tmp_path) in " ".join(p.cmdline())]


def test_a_failing_guest_test_fails_the_host_run_with_the_guest_message(tmp_path):
    before = {p.pid for p in qemu_processes()}  # guests of other runs on this machine are not ours
    env = dict(os.environ, CRYPTSNAP_DEMO_GUEST_FAILURE="1")
    node = "tests/system/test_harness.py::test_deliberate_guest_failure"
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", node],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 1, run.stdout[-3000:]
    assert "deliberate failure inside the guest" in run.stdout
    assert "1 failed" in run.stdout
    assert not {p.pid for p in qemu_processes()} - before, "the run left its qemu behind"


def test_run_with_a_disk_shows_it_as_vdb_and_keeps_the_image_as_it_was(tmp_path):
    """`tests.harness run --disk` (bench.scan_cache's way in): the guest reads the host's image
    and its writes to it are thrown away, so one image serves several boots."""
    content = tmp_path / "content"
    content.mkdir()
    (content / "hello").write_text("from the host\n")
    image = tmp_path / "disk.img"
    subprocess.run(["mke2fs", "-q", "-t", "ext4", "-d", str(content), str(image), "16M"], check=True)
    before = image.read_bytes()
    script = "mount /dev/vdb /mnt && cat /mnt/hello && echo guest > /mnt/written && umount /mnt"
    run = subprocess.run([sys.executable, "-m", "tests.harness", "run", "--timeout", "300", "--results",
                          str(tmp_path / "results"), "--disk", str(image), "--", "sh", "-c", script],
                         cwd=REPO, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0 and "from the host" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]
    assert image.read_bytes() == before, "the guest's write reached the host's image"
