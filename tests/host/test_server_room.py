"""init on a server without room for the image: refused with the numbers, nothing left there."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

from tests.support import sshd
from tests.support.checks import assert_nothing_left, cryptsnap
from tests.support.targets import make_setup


def test_init_on_a_full_server_names_the_numbers_and_leaves_nothing(tmp_path):
    server = sshd.start()
    remote = Path(server.remote_dir)
    disk = tmp_path / "server-disk.img"
    with open(disk, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(disk)], check=True)
    remote.mkdir()
    owner = pwd.getpwnam(server.user)
    subprocess.run(["mount", "-o", "loop", str(disk), str(remote)], check=True)
    try:
        os.chown(remote, owner.pw_uid, owner.pw_gid)
        (remote / "someone-else").write_bytes(b"\0" * (32 << 20))
        setup = make_setup(tmp_path, server, filesystem="ext2", size="40M")
        full = cryptsnap(setup, "init", setup.name, expect=12)
        assert "allocating: the server has " in full.stderr and "MiB free in" in full.stderr, full.stderr
        assert "the image needs 40 MiB" in full.stderr and "set a smaller size: for target" in full.stderr
        assert sorted(os.listdir(remote)) == ["lost+found", "someone-else"], "init left something on the server"
        assert not (setup.state_dir / setup.name / "image.json").exists()
        assert_nothing_left(setup, full.stderr)
        # Room made: init gets past allocating (on the host it then stops at unlocking: no device-mapper).
        (remote / "someone-else").unlink()
        again = cryptsnap(setup, "init", setup.name, expect=None)
        assert again.returncode != 12 and "Allocating" in again.stdout, again.stderr
        assert_nothing_left(setup, again.stderr)
    finally:
        subprocess.run(["umount", str(remote)], check=True)
        sshd.stop(server)
