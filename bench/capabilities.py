"""Find the capabilities a backup needs, by testing: run it with each one taken away.

Inside the test guest (real systemd):

    sudo python3 -m tests.harness run -- python3 -m bench.capabilities

Each run is `systemd-run --wait -p CapabilityBoundingSet=...` of `cryptsnap backup
--local` (plus a restore) on a tree with foreign owners, a setuid file, a device node,
ACLs and xattrs. A capability is needed when taking it away makes the run fail or the
restored tree differ. The result is the bounding set of systemd/cryptsnapd.service.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.support import sshd, trees
from tests.support.targets import make_setup

CANDIDATES = ["CAP_SYS_ADMIN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_CHOWN", "CAP_FOWNER",
              "CAP_FSETID", "CAP_MKNOD", "CAP_SETFCAP", "CAP_IPC_LOCK", "CAP_SYS_RESOURCE"]  # fmt: skip


def build_tree(root: Path) -> None:
    trees.build(root)
    suid = root / "setuid-tool"
    suid.write_text("#!/bin/sh\n")
    os.chown(suid, 1234, 1234)
    os.chmod(suid, 0o4755)
    os.mknod(root / "null-device", 0o600 | 0o020000, os.makedev(1, 3))
    private = root / "private"
    os.chown(private, 1234, 1234)
    os.chmod(private, 0o700)


def run(setup, caps: list[str], unit: str) -> tuple[bool, str]:
    env = [f"--setenv=PYTHONPATH={os.environ.get('PYTHONPATH', '')}"]
    base = ["systemd-run", "--wait", "--quiet", "--collect", f"--unit={unit}", "-p",
            f"CapabilityBoundingSet={' '.join(caps)}", *env, sys.executable, "-m", "cryptsnap"]  # fmt: skip
    backup = subprocess.run([*base, *setup.cli_args("backup", "--local", setup.name)], capture_output=True, text=True)
    if backup.returncode != 0:
        return False, f"backup failed: exit {backup.returncode}"
    dest = Path(tempfile.mkdtemp(dir="/var/tmp"))
    restore = subprocess.run(["python3", "-m", "cryptsnap", *setup.cli_args(
        "restore", f"{setup.name}@latest:{setup.source}", "--to", str(dest / "r"))], capture_output=True, text=True)
    if restore.returncode != 0:
        return False, f"restore failed: {restore.stderr.strip()[-200:]}"
    same = trees.manifest(dest / "r") == trees.manifest(setup.source)
    shutil.rmtree(dest)
    return same, "ok" if same else "restored tree differs from the source"


def main() -> int:
    server = sshd.start(base="/srv/cryptsnap-probe")
    try:
        results = {}
        for index, dropped in enumerate([None, *CANDIDATES]):
            work = Path(tempfile.mkdtemp(prefix="caps-", dir="/srv/cryptsnap-probe"))
            setup = make_setup(work, server, filesystem="btrfs", size="200M")
            shutil.rmtree(setup.source)
            build_tree(setup.source)
            subprocess.run(["python3", "-m", "cryptsnap", *setup.cli_args("init", setup.name)], check=True,
                           capture_output=True)  # fmt: skip
            caps = [c for c in CANDIDATES if c != dropped]
            ok, detail = run(setup, caps, f"cap-probe-{index}")
            results[dropped or "(none dropped)"] = (ok, detail)
            print(f"without {dropped or 'nothing':<22} {'works' if ok else 'FAILS'}: {detail}", flush=True)
    finally:
        sshd.stop(server)
    needed = [cap for cap, (ok, _) in results.items() if not ok and cap.startswith("CAP_")]
    print("\nneeded:", " ".join(needed))
    return 0 if results["(none dropped)"][0] else 1


if __name__ == "__main__":
    sys.exit(main())
