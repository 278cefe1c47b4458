"""`cryptsnap init` on an account that allows SFTP alone (the key restricted as init itself
recommends, or a storage service without a shell): the remote directory is made over SFTP;
the image can then only be sparse, and anything else is refused, saying why and what to do."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.checks import assert_nothing_left, cryptsnap
from tests.support.targets import make_setup


def sftp_only(server) -> None:
    keys = Path(server.identity).with_name("authorized_keys")
    keys.write_text('restrict,command="internal-sftp" ' + keys.read_text())


def test_init_on_an_sftp_only_account_refuses_a_preallocated_image_by_name(tmp_path, untrusted_host):
    setup = make_setup(tmp_path, untrusted_host, remote_dir=f"{untrusted_host.remote_dir}/nested/dir")
    sftp_only(untrusted_host)
    failed = cryptsnap(setup, "init", setup.name, expect=2)
    assert "allows SFTP only" in failed.stderr and "sparse: true" in failed.stderr, failed.stderr
    made = Path(untrusted_host.remote_dir) / "nested" / "dir"
    assert made.is_dir() and os.listdir(made) == [], "the directory is made over SFTP, and nothing left in it"
    assert_nothing_left(setup)


def test_init_on_an_sftp_only_account_makes_a_sparse_image_over_sftp(tmp_path, untrusted_host):
    setup = make_setup(tmp_path, untrusted_host, sparse=True)
    sftp_only(untrusted_host)
    if "device-mapper" in Path("/proc/misc").read_text():
        cryptsnap(setup, "init", setup.name)
        return
    # Without device-mapper here, init gets as far as unlocking: past the directory and the
    # image made over SFTP (the guest tier runs a complete init).
    result = cryptsnap(setup, "init", setup.name, expect=8)
    assert "unlocking: cryptsetup failed" in result.stderr, result.stderr
    assert_nothing_left(setup)
    assert os.listdir(setup.server.remote_dir) == [], "the half-made image must be removed"


@pytest.mark.parametrize("path, batch", [("cryptsnap", '-mkdir "cryptsnap"\n'),
                                         ("/srv/a b", '-mkdir "/srv"\n-mkdir "/srv/a b"\n')])  # fmt: skip
def test_the_sftp_batch_makes_each_parent(path, batch):
    from cryptsnap import commands

    assert commands.sftp_mkdirs(path) == batch
