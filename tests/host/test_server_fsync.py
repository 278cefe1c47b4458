"""A server whose SFTP cannot fsync is refused at init, unless the user accepts the risk."""

from __future__ import annotations

import os

import yaml

from cryptsnap.layers import check_server_fsync
from cryptsnap.state import TargetState
from tests.support import sshd
from tests.support.checks import assert_nothing_left, cryptsnap
from tests.support.targets import make_setup


def test_the_probe_sees_fsync_on_openssh(setup):
    state = TargetState(setup.load())
    (state.dir).mkdir(parents=True, exist_ok=True)
    state.known_hosts.write_text(setup.server.host_key_line.replace(
        f"[{setup.server.host}]:{setup.server.port}", f"cryptsnap-{setup.name}") + "\n")
    assert check_server_fsync(setup.load(), state.write_ssh_config()) is True


def test_init_refuses_a_server_that_denies_fsync_and_goes_on_when_told(tmp_path):
    server = sshd.start(sftp="/usr/lib/openssh/sftp-server -P fsync")
    try:
        setup = make_setup(tmp_path, server)
        refused = cryptsnap(setup, "init", setup.name, expect=13)
        assert "does not offer fsync@openssh.com" in refused.stderr, refused.stderr
        assert "require_fsync: false" in refused.stderr
        assert not os.path.exists(os.path.join(server.remote_dir, f"{setup.name}.img"))
        assert_nothing_left(setup)
        document = yaml.safe_load(setup.config_path.read_text())
        document["targets"][setup.name]["require_fsync"] = False
        setup.config_path.write_text(yaml.safe_dump(document))
        # On the host, init then stops at `unlocking` (no device-mapper); the guest goes further.
        accepted = cryptsnap(setup, "-v", "init", setup.name, expect=None)
        assert "accepted: require_fsync is false" in accepted.stderr, accepted.stderr
        assert accepted.returncode != 13
        assert_nothing_left(setup)
    finally:
        sshd.stop(server)
