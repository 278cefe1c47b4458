"""Count the btrfs tree nodes written at or after a generation, in an unmounted image file.

    python3 -m bench.generations IMAGE GENERATION

Reads every 4 KiB block of the image's metadata and system chunks (single profile, as
cryptsnap makes them) and counts the blocks whose header names their own address and a
generation >= GENERATION, by (generation, owner tree). Unlike `btrfs inspect-internal
dump-tree`, which shows only the nodes that are still part of a tree, this also finds the
copies a run wrote and then replaced within the same run (docs/performance.md, "One commit
per sync"). The image must not be mounted, and holds plaintext btrfs (no LUKS).
"""

from __future__ import annotations

import argparse
import collections
import re
import struct
import subprocess
import sys

HEADER = struct.Struct("<32s16sQQ16sQQ")  # csum, fsid, bytenr, flags, chunk tree uuid, generation, owner
TREES = {1: "root", 2: "extent", 3: "chunk", 4: "dev", 5: "fs", 7: "csum", 9: "uuid", 10: "free-space"}


def metadata_chunks(image: str) -> list[tuple[int, int, int]]:
    """(logical, physical, length) of each stripe of every METADATA or SYSTEM chunk, from btrfs-progs."""
    text = subprocess.run(["btrfs", "inspect-internal", "dump-tree", "-t", "chunk", image],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    chunks = []
    for item in re.split(r"\n\s*item \d+ key ", text):
        found = re.search(r"CHUNK_ITEM (\d+)\).*?length (\d+) owner \d+ stripe_len \d+\s+type (\S+)", item, re.S)
        if found and re.search("METADATA|SYSTEM", found.group(3)):
            for physical in re.findall(r"stripe \d+ devid \d+ offset (\d+)", item):  # dup: two copies
                chunks.append((int(found.group(1)), int(physical), int(found.group(2))))
    return chunks


def count(image: str, generation: int) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    with open(image, "rb") as f:
        for logical, physical, length in metadata_chunks(image):
            f.seek(physical)
            data = f.read(length)
            for offset in range(0, length - HEADER.size + 1, 4096):
                _, _, bytenr, _, _, written, owner = HEADER.unpack_from(data, offset)
                if bytenr == logical + offset and written >= generation:
                    counts[(written, owner)] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.generations", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("image")
    parser.add_argument("generation", type=int)
    args = parser.parse_args(argv)
    counts = count(args.image, args.generation)
    for (written, owner), n in sorted(counts.items()):
        print(f"generation {written} {TREES.get(owner, owner)}: {n}")
    print(f"total {sum(counts.values())} nodes ({sum(counts.values()) * 4096:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
