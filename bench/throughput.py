"""First backup and full restore: MB/s of cryptsnap beside a raw SFTP copy of the same bytes
over the same ssh (the ceiling), restic and borg.

Runs inside the test guest (cryptsnap needs dm-crypt), as root:

    sudo python3 -m tests.harness run -- python3 -m bench.throughput --link-mbit 0
    sudo python3 -m tests.harness run -- python3 -m bench.throughput --link-mbit 10 --large-mib 64 --small-files 2000
    sudo .venv/bin/python -m bench.throughput --methods sftp,restic,borg --link-mbit 0   # on the host: no cryptsnap

Two trees of random (incompressible) bytes: large files (--large-mib in files of
--large-file-mib) and small files (--small-files of --small-kb each). For each tree and
method: the time of the upload (a first backup into an empty image or repository; init is not
timed) and of a full restore into an empty directory, the bytes on the ssh connection (every
method's ssh goes through the same meter relay, cryptsnap.meter), and the rate in MB/s of the
tree's bytes. cryptsnap's fixed cost per run (connecting, opening and mounting the image,
unwinding) is measured too: a backup with nothing changed and a restore of one small file,
so the rate of the transfer itself can be told apart from it ("net" columns). Every restore
is checked: same files, same sizes, and a sample of files byte for byte. Each transfer also
says where the processor time went, process by process (bench.cpu: `cryptsnap.nbd` is the
block device server), so that a process that limits it shows.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench import link
from bench.cpu import CpuSampler
from bench.run import Reference, cryptsnap
from cryptsnap import meter
from cryptsnap.stack import Paths
from tests.support import udev
from tests.support.targets import make_setup

CHUNK = 1 << 20


@dataclass
class Transfer:
    """One timed transfer: seconds on the clock and bytes each way on the ssh connection."""

    seconds: float
    up: int
    down: int
    cpu: str = ""  # where the processor time went (bench.cpu)


# upload, restore, and the fixed cost of each in seconds where the method measures one
Measured = tuple[Transfer, Transfer, "tuple[float, float] | None"]


def timed(counter: Path, action: Callable[[], None], zeroed: bool = False) -> Transfer:
    """The action's time and traffic. `zeroed`: the action is a cryptsnap command, which zeroes
    its target's counter when it connects, so what the counter holds afterwards is its own."""
    before = meter.Traffic() if zeroed else meter.read(counter)
    started = time.monotonic()
    with CpuSampler(interval=2.0) as cpu:  # as run_memory: each look costs the emulated guest
        action()
    seconds = time.monotonic() - started
    used = meter.read(counter) - before
    return Transfer(seconds, used.up, used.down, cpu.summary(seconds))


def run(argv: list[str], env: dict | None = None, cwd: Path | None = None) -> None:
    subprocess.run(argv, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)


def make_large(root: Path, mib: int, file_mib: int) -> None:
    for number in range((mib + file_mib - 1) // file_mib):
        path = root / f"large{number:03d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as out:
            for _ in range(min(file_mib, mib - number * file_mib)):
                out.write(os.urandom(CHUNK))


def make_small(root: Path, count: int, kb: int) -> None:
    for number in range(count):
        path = root / f"d{number % 100:02d}" / f"f{number:06d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(kb << 10))


def files_of(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def same_tree(tree: Path, restored: Path, sample: int = 20) -> None:
    """The restore has the tree's files at their sizes, and a sample of them byte for byte."""
    want, got = files_of(tree), files_of(restored)
    if want != got:
        missing = sorted(set(want) - set(got))[:3]
        raise AssertionError(f"{restored} differs from {tree}: {len(want)} files against {len(got)}; "
                             f"missing or resized e.g. {missing}")  # fmt: skip
    for name in random.Random(1).sample(sorted(want), min(sample, len(want))):
        if not filecmp.cmp(tree / name, restored / name, shallow=False):
            raise AssertionError(f"{restored / name} does not match {tree / name}")


def found(top: Path, tree: Path) -> Path:
    """Where a tool that restores full paths put the tree under `top`."""
    return top / str(tree).lstrip("/")


def raw_sftp(ref: Reference, tree: Path, work: Path) -> Measured:
    """The ceiling: OpenSSH's sftp copying the tree up and back, with its default requests."""
    remote = f"{ref.target.remote_dir}/raw"
    batch_up, batch_down = work / "sftp-up", work / "sftp-down"
    batch_up.write_text(f"put -r {tree} {remote}\n")
    restored = work / "restored"
    batch_down.write_text(f"get -r {remote} {restored}\n")
    sftp = ["sftp", "-q", "-F", str(ref.config), "-b"]
    up = timed(ref.counter, lambda: run([*sftp, str(batch_up), ref.host]))
    down = timed(ref.counter, lambda: run([*sftp, str(batch_down), ref.host]))
    same_tree(tree, restored)
    return up, down, None  # (no fixed cost of its own measured)


def restic(ref: Reference, tree: Path, work: Path) -> Measured:
    base = ref.restic()
    run([*base, "init"], ref.env)
    up = timed(ref.counter, lambda: run([*base, "backup", str(tree)], ref.env))
    restored = work / "restored"
    down = timed(ref.counter, lambda: run([*base, "restore", "latest", "--target", str(restored)], ref.env))
    same_tree(tree, found(restored, tree))
    return up, down, None  # (no fixed cost of its own measured)


def borg(ref: Reference, tree: Path, work: Path) -> Measured:
    repo = ref.borg_repo()
    run(["borg", "init", "--encryption=repokey", repo], ref.env)
    up = timed(ref.counter, lambda: run(["borg", "create", f"{repo}::one", str(tree)], ref.env))
    restored = work / "restored"
    restored.mkdir()
    down = timed(ref.counter, lambda: run(["borg", "extract", f"{repo}::one"], ref.env, cwd=restored))
    same_tree(tree, found(restored, tree))
    return up, down, None  # (no fixed cost of its own measured)


def cryptsnap_method(filesystem: str) -> Callable:
    def measure(ref: Reference, tree: Path, work: Path) -> Measured:
        data = sum(files_of(tree).values())
        setup = make_setup(work / "cryptsnap", ref.server, filesystem=filesystem,
                           size=f"{data * 13 // 10 // 2**20 + 200}M", sources=[str(tree)])  # fmt: skip
        counter = Paths.of(setup.load()).traffic

        def timed_cli(*args: str) -> Transfer:
            return timed(counter, lambda: cryptsnap(setup, *args), zeroed=True)

        cryptsnap(setup, "init", setup.name)
        up = timed_cli("backup", setup.name)
        restored = work / "restored"
        down = timed_cli("restore", f"{setup.name}@latest:{tree}", "--to", str(restored))
        same_tree(tree, restored)
        # The fixed cost of a run, to tell the transfer's rate apart from it.
        idle_up = timed_cli("backup", setup.name)
        one = min(files_of(tree).items(), key=lambda item: item[1])[0]
        idle_down = timed_cli("restore", f"{setup.name}@latest:{tree / one}", "--to", str(work / "one"))
        return up, down, (idle_up.seconds, idle_down.seconds)

    return measure


METHODS = {"sftp": raw_sftp, "cryptsnap": cryptsnap_method("btrfs"), "cryptsnap-ext4": cryptsnap_method("ext4"),
           "restic": restic, "borg": borg}  # fmt: skip


def measure_tree(name: str, tree: Path, server, work: Path, methods: list[str]) -> list[dict]:
    sizes = files_of(tree)
    data, count = sum(sizes.values()), len(sizes)
    rows = []
    for method in methods:
        place = work / method
        place.mkdir(parents=True)
        ref = Reference.prepare(server, place)
        up, down, fixed = METHODS[method](ref, tree, place)
        fixed = fixed or (0.0, 0.0)
        rows.append({"tree": name, "method": method, "bytes": data, "files": count,
                     "up_seconds": up.seconds, "down_seconds": down.seconds, "wire_up": up.up + down.up,
                     "wire_down": up.down + down.down, "upload_wire_up": up.up, "restore_wire_down": down.down,
                     "fixed_up_seconds": fixed[0], "fixed_down_seconds": fixed[1],
                     "up_cpu": up.cpu, "down_cpu": down.cpu})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
        shutil.rmtree(place)  # the restored copy
        shutil.rmtree(server.remote_dir, ignore_errors=True)  # the method's image or repository
        os.makedirs(server.remote_dir)
        shutil.chown(server.remote_dir, server.user, server.user)
    return rows


def table(rows: list[dict], mbit: float) -> str:
    ceiling = {r["tree"]: r for r in rows if r["method"] == "sftp"}
    where = f"behind {mbit:g} Mbit/s each way" if mbit else "loopback"
    lines = ["| tree | method | upload MB/s | of sftp | restore MB/s | of sftp | up s | down s | "
             "net up MB/s | net down MB/s | wire up/tree | wire down/tree |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        up_rate, down_rate = r["bytes"] / r["up_seconds"] / 1e6, r["bytes"] / r["down_seconds"] / 1e6
        top = ceiling.get(r["tree"])
        of_up = f"{top['up_seconds'] / r['up_seconds']:.0%}" if top else "-"  # rate / the ceiling's rate
        of_down = f"{top['down_seconds'] / r['down_seconds']:.0%}" if top else "-"
        net_up = net_down = "-"
        if r["fixed_up_seconds"]:
            net_up = f"{r['bytes'] / max(r['up_seconds'] - r['fixed_up_seconds'], 1e-3) / 1e6:.2f}"
            net_down = f"{r['bytes'] / max(r['down_seconds'] - r['fixed_down_seconds'], 1e-3) / 1e6:.2f}"
        lines.append(f"| {r['tree']} | {r['method']} | {up_rate:.2f} | {of_up} | {down_rate:.2f} | {of_down} | "
                     f"{r['up_seconds']:.1f} | {r['down_seconds']:.1f} | {net_up} | {net_down} | "
                     f"{r['upload_wire_up'] / r['bytes']:.3f}x | {r['restore_wire_down'] / r['bytes']:.3f}x |")
    note = f"{where}; MB = 10^6 bytes of the tree per second of wall time"
    if mbit:
        note += f"; the link carries at most {mbit / 8:.2f} MB/s"
    return "\n".join(lines + ["", note])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large-mib", type=int, default=512, help="MiB of large files (default 512; 0: none)")
    parser.add_argument("--large-file-mib", type=int, default=64, help="size of each large file (default 64)")
    parser.add_argument("--small-files", type=int, default=20000, help="small files (default 20000; 0: none)")
    parser.add_argument("--small-kb", type=int, default=4, help="size of each small file in KiB (default 4)")
    parser.add_argument("--methods", default="sftp,cryptsnap,restic,borg",
                        help=f"what to measure, of {','.join(METHODS)} (sftp: the ceiling; list it first)")
    link.add_arguments(parser, mbit=0.0)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; known: {', '.join(METHODS)}")

    work = Path(tempfile.mkdtemp(prefix="cryptsnap-throughput-", dir="/var/tmp"))
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        if any(m.startswith("cryptsnap") for m in methods):
            udev.install_rule()
        server = stack.enter_context(link.untrusted_host(args.link_mbit, args.rtt_ms))
        trees = []
        if args.large_mib:
            trees.append((f"{args.large_mib} MiB in {args.large_file_mib} MiB files",
                          lambda root: make_large(root, args.large_mib, args.large_file_mib)))  # fmt: skip
        if args.small_files:
            trees.append((f"{args.small_files:,} files of {args.small_kb} KiB",
                          lambda root: make_small(root, args.small_files, args.small_kb)))  # fmt: skip
        for number, (name, make) in enumerate(trees):
            tree = work / f"tree{number}"
            make(tree)
            rows += measure_tree(name, tree, server, work / f"runs{number}", methods)
            shutil.rmtree(tree)
    print()
    print(table(rows, args.link_mbit))
    print()
    for r in rows:  # which process, if any, limits each transfer
        print(f"{r['tree']}, {r['method']}: upload: {r['up_cpu']}\n    restore: {r['down_cpu']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"link_mbit": args.link_mbit, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
