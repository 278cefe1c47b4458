"""The guest tests' copies of an initialized target (tests/support/targets.py: InitializedCopy):
byte for byte the image, allocated in full, owned by the server's user, and a state directory
that pins the new server's host key under the new target's name, so ssh to it just works.

The host lacks device-mapper, so the kept target here is what `init` makes up to
`cryptsetup open` (tests/host/test_layers.py: prepare); the guest tests copy whole inits.
"""

from __future__ import annotations

import os
import pwd
import shutil

from cryptsnap import commands, meter, runner
from cryptsnap.stack import Paths
from cryptsnap.state import TargetState
from tests.host.test_layers import prepare
from tests.support import sshd
from tests.support.targets import InitializedCopy, make_setup


def test_a_copy_is_the_kept_image_on_its_own_server_with_that_servers_host_key_pinned(setup, tmp_path):
    target, state, _ = prepare(setup)
    original = os.path.join(setup.server.remote_dir, target.image)
    with open(original, "r+b") as image:  # a written part beyond the header, as mkfs leaves
        image.seek(100 << 20)
        image.write(os.urandom(1 << 20))
    kept = InitializedCopy.keep(setup, tmp_path / "kept")
    assert os.path.getsize(kept.image) == target.size
    assert os.stat(kept.image).st_blocks * 512 < target.size // 2, "the kept image should hold only the written parts"

    other = sshd.start()
    copy = make_setup(tmp_path / "copy", other)
    copied = copy.load()
    traffic = Paths.of(copied).traffic
    try:
        kept.copy_to(copy)
        image = os.path.join(other.remote_dir, copied.image)
        with open(original, "rb") as a, open(image, "rb") as b:
            assert a.read() == b.read(), "the copy's image differs from the kept one"
        info = os.stat(image)
        assert info.st_blocks * 512 >= target.size, "the copy should be allocated in full, as init allocates it"
        assert info.st_uid == pwd.getpwnam(other.user).pw_uid
        assert copy.key_file.read_bytes() == setup.key_file.read_bytes()
        copied_state = TargetState(copied)
        assert copied_state.image() == state.image()
        assert copied_state.header_backup.read_bytes() == state.header_backup.read_bytes()
        # The pinned key is the new server's, under the new target's alias: ssh just works
        # (through the meter, as in a run, which first makes its counter).
        meter.reset(traffic)
        result = runner.run(commands.ssh(str(copied_state.ssh_config), copied, ["echo", "reached"]))
        assert result.stdout.strip() == "reached"
    finally:
        sshd.stop(other)
        shutil.rmtree(traffic.parent, ignore_errors=True)
