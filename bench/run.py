"""Traffic benchmark: bytes on the ssh connection for one incremental run, per method.

Runs inside the test guest (it needs dm-crypt), as root:

    sudo python3 -m tests.harness run -- python3 -m bench.run [options]     # from the host
    python3 -m bench.run --files 1000 --changed 60                          # inside the guest

For each file system mode the real pipeline (sshfs, nbd or loop, LUKS, mount, rsync) backs up a
tree, then the same files are rewritten and a second run is measured. restic (sftp) and
borg (ssh) back up the same data through the same ssh configuration, so the same meter
(cryptsnap.meter, the ProxyCommand relay) counts their bytes too. Results are multiples of
the changed bytes: "up 1.50x" means 1.5 bytes sent per byte changed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import link
from cryptsnap import meter
from cryptsnap.config import Target
from cryptsnap.stack import Paths
from cryptsnap.state import TargetState
from tests.support import udev
from tests.support.targets import make_setup


def make_tree(root: Path, files: int, size: int, compressible: bool, seed: int = 1) -> list[Path]:
    rng = random.Random(seed)
    paths = []
    for i in range(files):
        path = root / f"d{i % 50:02d}" / f"f{i:06d}.dat"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content(rng, size, compressible))
        paths.append(path)
    return paths


def content(rng: random.Random, size: int, compressible: bool) -> bytes:
    if compressible:
        words = [b"backup", b"snapshot", b"encrypted", b"incremental", b"remote", b"rsync", b"\n"]
        out = bytearray()
        while len(out) < size:
            out += rng.choice(words) + b" "
        return bytes(out[:size])
    return os.urandom(size)


def change(paths: list[Path], count: int, size: int, compressible: bool, seed: int) -> int:
    """Rewrite `count` scattered files with `size` new bytes each; return the bytes changed."""
    rng = random.Random(seed)
    chosen = rng.sample(paths, count)
    for path in chosen:
        path.write_bytes(content(rng, size, compressible))
    return count * size


def cryptsnap(setup, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "cryptsnap", *setup.cli_args(*args)], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip


def run_cryptsnap(mode: str, server, work: Path, args) -> dict:
    filesystem, _, variant = mode.partition("-")  # btrfs-loop: without the metadata cache; btrfs-layers
    extra = {"loop": {"metadata_cache": False}, "layers": {"history": "layers"}}.get(variant, {})
    setup = make_setup(work, server, filesystem=filesystem, size=args.size, **extra)
    shutil.rmtree(setup.source)
    shutil.copytree(args.tree, setup.source, symlinks=True)
    cryptsnap(setup, "init", setup.name)
    cryptsnap(setup, "backup", setup.name)
    changed = args.mutate(setup.source)
    started = time.monotonic()
    cryptsnap(setup, "backup", setup.name)
    seconds = time.monotonic() - started
    record = TargetState(setup.load()).last_run()
    cryptsnap(setup, "backup", setup.name)  # once more with nothing changed: the fixed cost of a run
    idle = TargetState(setup.load()).last_run()
    return {"method": f"cryptsnap {mode}", "changed": changed, "up": record["bytes_up"],
            "down": record["bytes_down"], "seconds": seconds, "phases": record["traffic"],
            "steps": record.get("traffic_steps", {}), "idle_up": idle["bytes_up"], "idle_down": idle["bytes_down"]}


@dataclass
class Reference:
    """The ssh a reference tool (or raw sftp) runs through: a target's pinned host key and its
    metered ssh config, so the same meter counts every method's bytes; and an environment for
    restic and borg."""

    server: object
    target: Target
    config: Path  # ssh -F this
    host: str  # the Host alias in it
    counter: Path  # cryptsnap.meter's counter of that ssh
    env: dict

    @classmethod
    def prepare(cls, server, work: Path) -> Reference:
        from cryptsnap.initialize import pin_host_key, remote_run

        target = make_setup(work, server).load()
        state = TargetState(target)
        state.ensure_dir()
        pin_host_key(target, state, False, lambda line: None)
        counter = Paths.of(target).traffic
        meter.reset(counter)
        config = state.write_ssh_config(counter)
        remote_run(config, target, ["mkdir", "-p", target.remote_dir])
        env = dict(os.environ, HOME=str(work), RESTIC_PASSWORD="bench", BORG_PASSPHRASE="bench",
                   BORG_RSH=f"ssh -F {config}", BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                   BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")  # fmt: skip
        return cls(server, target, Path(config), f"cryptsnap-{target.name}", counter, env)

    def restic(self) -> list[str]:
        """restic's command for its repository on the server, through this ssh."""
        return ["restic", "-q", "-r", f"sftp:{self.host}:{self.target.remote_dir}/restic",
                "-o", f"sftp.command=ssh -F {self.config} {self.host} -s sftp"]  # fmt: skip

    def borg_repo(self) -> str:
        return f"ssh://{self.host}/./{self.target.remote_dir}/borg"


def run_reference(tool: str, server, work: Path, args) -> dict:
    """restic or borg over the same ssh configuration and meter."""
    ref = Reference.prepare(server, work)
    source = Path(ref.target.sources[0])
    shutil.rmtree(source)
    shutil.copytree(args.tree, source, symlinks=True)
    env, counter = ref.env, ref.counter
    if tool == "restic":
        base = ref.restic()
        commands = [[*base, "init"], [*base, "backup", str(source)]]
        incremental = [*base, "backup", str(source)]
    else:
        repo = ref.borg_repo()
        commands = [["borg", "init", "--encryption=repokey", repo],
                    ["borg", "create", f"{repo}::one", str(source)]]
        incremental = ["borg", "create", f"{repo}::two", str(source)]
    for argv in commands:
        subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    changed = args.mutate(source)
    before = meter.read(counter)
    started = time.monotonic()
    subprocess.run(incremental, env=env, check=True, stdout=subprocess.DEVNULL)
    used = meter.read(counter) - before
    return {"method": tool, "changed": changed, "up": used.up, "down": used.down,
            "seconds": time.monotonic() - started}


def table(rows: list[dict], title: str, mbit: float) -> str:
    link = f"wall s at {mbit:g} Mbit/s" if mbit else "wall s (loopback)"
    lines = [f"### {title}", "", f"| method | changed bytes | up | down | up x | down x | {link} | x ideal |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ideal = r["changed"] * 8 / (mbit * 1e6) if mbit else 0
        multiple = f"{r['seconds'] / ideal:.1f}x" if ideal else "-"
        lines.append(f"| {r['method']} | {r['changed']:,} | {r['up']:,} | {r['down']:,} | "
                     f"{r['up'] / r['changed']:.2f}x | {r['down'] / r['changed']:.2f}x | {r['seconds']:.1f} | "
                     f"{multiple} |")
    if mbit:
        lines += ["", f"ideal: changed bytes / {mbit:g} Mbit/s = {rows[0]['changed'] * 8 / (mbit * 1e6):.1f} s "
                      f"(the guest's emulated CPU adds a fixed cost per run; see docs/performance.md)"]
    return "\n".join(lines)


def unchanged_cost(small: dict, large: dict, extra_files: int) -> str:
    """Two views: the growth of a run with the same change, and of a run with nothing changed."""
    up = (large["up"] - small["up"]) / extra_files
    down = (large["down"] - small["down"]) / extra_files
    idle_up = (large["idle_up"] - small["idle_up"]) / extra_files
    idle_down = (large["idle_down"] - small["idle_down"]) / extra_files
    return (f"cost per unchanged file ({small['files']:,} -> {large['files']:,} files): "
            f"same change: up {up:.1f} B, down {down:.1f} B; nothing changed: up {idle_up:.1f} B, "
            f"down {idle_down:.1f} B (a run with nothing changed: up {small['idle_up']:,} / down "
            f"{small['idle_down']:,} bytes at {small['files']:,} files, {large['idle_up']:,} / "
            f"{large['idle_down']:,} at {large['files']:,})")


def title(args, files: int) -> str:
    kind = "compressible" if args.compressible else "incompressible"
    return f"{files} files of {args.file_kb} KiB; {args.changed} rewritten as {args.changed_kb} KiB of {kind} data"


def measure(args, server, work: Path, files: int) -> list[dict]:
    """Make a tree, back it up with each method, change it, and measure the second run."""
    tree = work / "tree"
    paths = make_tree(tree, files, args.file_kb << 10, args.compressible)
    relative = [p.relative_to(tree) for p in paths]
    args.tree = tree
    room = (files * (args.file_kb << 10) * 2 + (128 << 20)) >> 20  # snapshots of the tree, and metadata
    args.size = f"{max(int(args.image_size.rstrip('M')), room)}M"
    args.mutate = lambda source: change([source / r for r in relative], args.changed, args.changed_kb << 10,
                                        args.compressible, 7)  # fmt: skip
    rows = []
    for mode in filter(None, args.modes.split(",")):
        rows.append(dict(run_cryptsnap(mode, server, work / mode, args), files=files))
        print(json.dumps(rows[-1]), flush=True)
    for tool in filter(None, args.references.split(",")):
        rows.append(dict(run_reference(tool, server, work / tool, args), files=files))
        print(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(tree)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000, help="files in the tree (default 1000)")
    parser.add_argument("--file-kb", type=int, default=20, help="size of each file in KiB (default 20)")
    parser.add_argument("--changed", type=int, default=30, help="files rewritten between runs (default 30)")
    parser.add_argument("--changed-kb", type=int, default=100, help="new size of each changed file (default 100)")
    parser.add_argument("--compressible", action="store_true", help="text-like data instead of random bytes")
    parser.add_argument("--modes", default="btrfs,btrfs-loop,ext2,ext4",
                        help="cryptsnap file systems to measure (btrfs-loop: btrfs without the metadata cache; "
                             "btrfs-layers: history: layers)")  # fmt: skip
    parser.add_argument("--references", default="restic,borg", help="reference tools to measure ('' for none)")
    parser.add_argument("--image-size", default="300M", help="image size in MiB, e.g. 300M (at least twice the tree)")
    link.add_arguments(parser, mbit=10.0)
    parser.add_argument("--scale", type=int, default=0, metavar="K",
                        help="also back up a tree K times larger with the same change (the first mode only, "
                             "no reference) and print the cost per unchanged file")  # fmt: skip
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="cryptsnap-bench-", dir="/var/tmp"))
    udev.install_rule()
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)  # the trees and images: gigabytes at --scale
        server = stack.enter_context(link.untrusted_host(args.link_mbit, args.rtt_ms))
        rows = measure(args, server, work, args.files)
        lines = [table(rows, title(args, args.files), args.link_mbit)]
        if args.scale:
            small = rows[0]
            args.modes, args.references = args.modes.split(",")[0], ""
            large = measure(args, server, work / "scaled", args.files * args.scale)[0]
            lines += ["", table([large], title(args, large["files"]), args.link_mbit), "",
                      unchanged_cost(small, large, large["files"] - small["files"])]
            rows.append(large)
    print()
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"title": title(args, args.files), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
