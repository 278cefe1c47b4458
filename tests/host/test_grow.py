"""Growing the image on the server (`cryptsnap resize`'s first half; the guest tier grows the
file system too): without sending its bytes, recorded once durable, refused when the image
is not what this machine recorded or the account cannot allocate."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cryptsnap import meter
from cryptsnap.errors import IntegrityError, UsageError
from cryptsnap.initialize import grow_image
from cryptsnap.layers import RemoteLock, SshfsMount
from tests.host.test_init_sftp_only import sftp_only
from tests.host.test_layers import prepare
from tests.support.checks import assert_nothing_left

MIB = 1 << 20


def grow(setup, target, state, paths, size):
    meter.reset(paths.traffic)  # as open_stack does: the run's traffic is counted from here
    state.write_ssh_config(paths.traffic)
    with SshfsMount(target, state.ssh_config, paths.remote), RemoteLock(paths.remote, target.image, "resize"):
        grow_image(target, state, paths.remote / target.image, size, lambda line: None)


def test_the_image_grows_on_the_server_without_its_bytes_crossing_and_the_new_size_is_recorded(setup):
    target, state, paths = prepare(setup, luks=False)
    image = Path(setup.server.remote_dir) / target.image
    before = image.stat()
    grow(setup, target, state, paths, before.st_size + 64 * MIB)
    after = image.stat()
    assert after.st_size == before.st_size + 64 * MIB and state.image()["size"] == after.st_size
    assert after.st_blocks * 512 >= after.st_size, "grown with fallocate: allocated, not sparse"
    assert meter.read(paths.traffic).up < MIB, "the new bytes crossed the network"
    grow(setup, target, state, paths, after.st_size)  # the same size again: nothing to do
    assert_nothing_left(setup)


def test_an_image_changed_on_the_server_is_not_grown(setup):
    target, state, paths = prepare(setup, luks=False)
    image = Path(setup.server.remote_dir) / target.image
    os.truncate(image, image.stat().st_size - MIB)
    with pytest.raises(IntegrityError, match="not the .* this machine recorded"):
        grow(setup, target, state, paths, image.stat().st_size + 64 * MIB)
    assert_nothing_left(setup)


def test_an_sftp_only_account_grows_only_a_sparse_image(setup):
    target, state, paths = prepare(setup, luks=False)
    size = state.image()["size"]
    sftp_only(setup.server)
    with pytest.raises(UsageError, match="allows SFTP only"):
        grow(setup, target, state, paths, size + 64 * MIB)
    assert state.image()["size"] == size
    assert (Path(setup.server.remote_dir) / target.image).stat().st_size == size, "the refused growth was not undone"
    sparse = setup.load()  # the same target with sparse: true
    object.__setattr__(sparse, "sparse", True)
    grow(setup, sparse, state, paths, size + 64 * MIB)
    assert (Path(setup.server.remote_dir) / target.image).stat().st_size == size + 64 * MIB
    assert state.image()["size"] == size + 64 * MIB
    assert_nothing_left(setup)
