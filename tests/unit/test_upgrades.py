"""cryptsnap.upgrades: the package's files replaced (as dpkg does: a .dpkg-new renamed over the
old file) are noticed once they stay quiet; Python's own __pycache__ writes are not."""

from __future__ import annotations

import os
import time

from gi.repository import GLib

from cryptsnap.upgrades import InstalledFiles


def run_for(seconds: float) -> None:
    context = GLib.MainContext.default()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        context.iteration(False)
        time.sleep(0.01)


def test_replaced_code_is_noticed_once_quiet_and_pycache_is_not(tmp_path):
    (tmp_path / "daemon.py").write_text("old\n")
    seen = []
    watch = InstalledFiles(lambda: seen.append(time.monotonic()), tmp_path, quiet_ms=300)
    try:
        (tmp_path / "__pycache__").mkdir()
        (tmp_path / "__pycache__" / "daemon.cpython-311.pyc").write_bytes(b"compiled")
        run_for(0.8)
        assert seen == [], "Python's own cache writes are not an upgrade"
        for name in ("daemon.py", "bus.py", "org.cryptsnap1.xml"):  # one by one, as dpkg unpacks
            (tmp_path / f"{name}.dpkg-new").write_text("new\n")
            os.rename(tmp_path / f"{name}.dpkg-new", tmp_path / name)
            run_for(0.1)
        assert seen == [], "noticed before the files were quiet"
        run_for(0.8)
        assert len(seen) == 1
    finally:
        watch.close()
