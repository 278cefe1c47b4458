"""`cryptsnap resize`: the image and the file system in it grow; snapshots are kept; what did
not fit before fits now; shrinking is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.checks import assert_nothing_left, cryptsnap
from tests.support.runs import digests, fill, with_one_snapshot

MIB = 1 << 20


@pytest.mark.parametrize("filesystem", ["btrfs", "ext2"])
@pytest.mark.long  # 200 MiB backed up and checked after the growth: minutes on the emulated CPU
def test_resize_grows_the_image_and_its_file_system_keeping_every_snapshot(tmp_path, untrusted_host, filesystem):
    setup, before = with_one_snapshot(tmp_path, untrusted_host, filesystem=filesystem, size="160M")
    image = Path(untrusted_host.remote_dir) / f"{setup.name}.img"
    assert image.stat().st_size == 160 * MIB

    refused = cryptsnap(setup, "resize", setup.name, "100M", expect=2)
    assert "cannot shrink" in refused.stderr, refused.stderr

    grown = cryptsnap(setup, "resize", setup.name, "400M").stdout
    assert "grown from 167,772,160 to 419,430,400 bytes" in grown, grown
    assert "set size: 400M" in grown, grown  # the configuration still says 160M: said, not changed
    assert image.stat().st_size == 400 * MIB
    assert image.stat().st_blocks * 512 >= 400 * MIB, "grown preallocated (fallocate on the server)"
    state = json.loads((setup.state_dir / setup.name / "image.json").read_text())
    assert state["size"] == 400 * MIB
    assert_nothing_left(setup)

    fill(setup.source, 200, name="big")  # would not have fitted in 160M
    cryptsnap(setup, "backup", setup.name)
    after = digests(setup)
    assert len(after) == 2 and {name: after[name] for name in before} == before
    checked = cryptsnap(setup, "check", setup.name)  # the header, generation, and data read back
    assert "identical" in checked.stdout
    assert_nothing_left(setup)
