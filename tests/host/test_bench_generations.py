"""bench.generations finds every node btrfs-progs lists in an image, and dates them right."""

from __future__ import annotations

import re
import subprocess

from bench import generations
from tests.support import loopfs


def test_every_listed_node_is_counted_with_its_generation(tmp_path):
    image = tmp_path / "fs.img"
    with loopfs.btrfs(image, tmp_path / "mnt") as device:
        for i in range(300):
            (tmp_path / "mnt" / f"f{i}").write_bytes(b"x" * 3000)
        subprocess.run(["btrfs", "filesystem", "sync", str(tmp_path / "mnt")], check=True)
        subprocess.run(["umount", str(tmp_path / "mnt")], check=True)
        listing = subprocess.run(["btrfs", "inspect-internal", "dump-tree", device], capture_output=True,
                                 text=True, check=True).stdout  # fmt: skip
    listed = {(int(g), owner) for g, owner in
              re.findall(r"^(?:node|leaf) \d+ (?:level \d+ )?items \d+ free space \d+ generation (\d+) owner (\S+)",
                         listing, re.M)}  # fmt: skip
    newest = max(g for g, _ in listed)
    counted = generations.count(str(image), 0)
    assert counted[(newest, 1)] >= 1 and counted[(newest, 2)] >= 1  # that commit wrote the root and extent trees
    assert sum(counted.values()) >= len(re.findall(r"^(?:node|leaf) \d+ (?:level \d+ )?items", listing, re.M))
    assert not generations.count(str(image), newest + 1)
    assert sum(generations.count(str(image), newest).values()) < sum(counted.values())
