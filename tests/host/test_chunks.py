"""cryptsnap.chunks reads a mounted btrfs's chunk tree with an ioctl; btrfs-progs is the oracle."""

from __future__ import annotations

import os
import subprocess
import threading

import pytest

from bench import generations
from cryptsnap import chunks
from tests.support import loopfs


def dump_tree_ranges(device: str) -> list[tuple[int, int]]:
    """[start, end) of each METADATA or SYSTEM stripe, as `btrfs inspect-internal dump-tree -t chunk` shows it."""
    return sorted((physical, physical + length) for _, physical, length in generations.metadata_chunks(device))


@pytest.fixture
def btrfs(tmp_path):
    mountpoint = tmp_path / "mnt"
    with loopfs.btrfs(tmp_path / "fs.img", mountpoint, cryptsnap_options=False) as device:
        yield device, mountpoint


def test_the_metadata_ranges_are_the_chunk_trees_and_new_chunks_are_seen(btrfs):
    device, mountpoint = btrfs
    first = sorted(chunks.metadata_ranges(mountpoint))
    assert len(first) >= 2 and first == dump_tree_ranges(device)
    seen: list[list[tuple[int, int]]] = []
    called = threading.Event()

    def on_ranges(ranges):
        seen.append(ranges)
        called.set()

    with chunks.Watch(mountpoint, on_ranges, interval=0.1):
        assert seen == [first]
        called.clear()
        # Enough small files to fill the first metadata chunk: btrfs allocates another.
        for d in range(40):
            os.mkdir(mountpoint / f"d{d}")
            for f in range(1000):
                (mountpoint / f"d{d}" / f"{f}").write_bytes(b"x" * 100)  # inline: metadata only
            subprocess.run(["sync"], check=True)
            if len(sorted(chunks.metadata_ranges(mountpoint))) > len(first):
                break
        assert called.wait(5), "the watch did not report the new chunk"
    grown = sorted(chunks.metadata_ranges(mountpoint))
    assert len(grown) > len(first) and seen[-1] == grown
    subprocess.run(["umount", str(mountpoint)], check=True)
    assert grown == dump_tree_ranges(device)
