"""The scattered change on a plain btrfs, without network, LUKS or guest: bytes written to the
block device by one run's file-system work, in seconds, for trying mkfs and mount options.

    sudo python3 -m bench.scatter_lab --files 100000                 # cryptsnap's options
    sudo python3 -m bench.scatter_lab --files 100000 --mkfs='-n 16384' --no-snapshot

A btrfs on a loop device over a sparse file under --dir, a tree of FILES files of FILE_KB
(100 a directory), then RUNS runs of: a writable snapshot of the last one (as a backup makes
it), CHANGED files rewritten as CHANGED_KB of random data, a sync. Prints the bytes written
per run divided by the changed bytes. dm-crypt maps sectors one to one and the sync is a
run's own commit, so this is the upload of the guest benchmark's `syncing` step without the
SFTP framing (docs/performance.md: 1.79x at 100,000 files there, 1.79x here).

--fs nilfs2 tries a log-structured file system instead: the tree in place, and a run's
snapshot a checkpoint made a snapshot after the change (`mkcp -s`), which copies no tree
(new blocks go to the log's end; old checkpoints keep the old ones). Needs nilfs-tools and
the kernel's nilfs2 module (the guest's kernel has it; these machines' own kernel does not).
It is mounted without the cleaner (`mount -i`: no mount.nilfs2 helper), whose moves of live
blocks out of old segments would be further writes, not counted here (bench.cleaner_lab
counts them).

--fs thin puts ext4 on a dm-thin volume (device-mapper's thin provisioning, the kernel's
dm-thin-pool, as LVM's thin snapshots use it): block-level snapshots below the file system,
whose reference counts are a space map (two bits a block) rather than items in a tree.
A run's snapshot is the pool's `create_snap` of the volume after the change (the file
system frozen by `dmsetup suspend`); the first write to a block still shared with a
snapshot copies the whole pool block (--thin-block-kb, 64 at least). Counted: the pool's
metadata and data devices together. Needs the guest (device-mapper).

--fs overlay keeps history as layers instead of snapshots: one ext4 (or --upper xfs) holds a
directory a run, and a run writes only what it changes into its own layer, through an overlay
mount (the kernel's overlayfs) whose lower layers are all the runs before it, read-only; a
snapshot is the stack of layers up to it, which stock tools mount read-only
(`mount -t overlay -o lowerdir=N:...:1:0`). Nothing is copied or counted per file of the tree:
a changed file is a new file in the run's layer, its directories copied up (metadata only).
At the end every kept state is mounted read-only from its layers and compared with what was
written (the lab fails otherwise).

--keep K keeps the last K states, as retention would: btrfs deletes the oldest snapshot (and
waits for its cleaner), overlay merges layer 1 into layer 0 (cryptsnap.overlay);
the bytes each costs are printed apart from the runs'. --delete N deletes N more files a run (overlay
writes them as whiteouts, which the merge must apply).

--integrity puts the file system on LUKS2 with authenticated encryption (dm-integrity keeps
an HMAC of every sector), as a file system without checksums of its own would need against
a hostile host; the bytes are still counted on the loop device, tags and journal included.

--cold drops the page cache before each run's change and counts the bytes read as well: a
run's download where nothing is cached locally (cryptsnap's metadata cache serves btrfs's).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import shlex
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from bench import overlay_layers
from cryptsnap import commands
from tests.support.loopfs import device_read, device_written


def run(*argv: str, cwd: Path | None = None) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    if done.returncode:
        raise RuntimeError(f"{shlex.join(argv)} exited {done.returncode}: {(done.stderr or done.stdout).strip()}")


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def write_tree(root: Path, files: int, size: int) -> bytes:
    """FILES files of SIZE bytes (at least 8), 100 a directory, each different (no
    deduplication to help). Returns the bytes file i's content is made of (`original`)."""
    content = os.urandom(size)
    for i in range(files):
        directory = root / f"d{i // 100}"
        if i % 100 == 0:
            directory.mkdir()
        (directory / f"f{i}").write_bytes(original(content, i))
    return content


def original(content: bytes, i: int) -> bytes:
    return content[:-8] + i.to_bytes(8, "little")


def file_path(i: int) -> str:
    return f"d{i // 100}/f{i}"


def change(root: Path, rng: random.Random, args: argparse.Namespace) -> dict[int, bytes | None]:
    """The scattered change: CHANGED files drawn at random rewritten as CHANGED_KB of random
    data, and --delete others deleted. Returns each changed file's new content (None: deleted),
    by number."""
    changed: dict[int, bytes | None] = {
        i: os.urandom(args.changed_kb << 10) for i in rng.sample(range(args.files), args.changed)
    }
    for i, data in changed.items():
        (root / file_path(i)).write_bytes(data)
    if getattr(args, "delete", 0):  # (drawn only then: the other figures' seeds stay as they were)
        drawn = (i for i in rng.sample(range(args.files), args.files) if i not in changed)
        present = (i for i in drawn if (root / file_path(i)).exists())  # (stats only as many as it takes)
        for i in list(itertools.islice(present, args.delete)):
            (root / file_path(i)).unlink()
            changed[i] = None
    return changed


@contextlib.contextmanager
def loop(image: Path) -> Iterator[str]:
    device = subprocess.run(["losetup", "--find", "--show", str(image)], capture_output=True, text=True,
                            check=True).stdout.strip()  # fmt: skip
    try:
        yield device
    finally:
        subprocess.run(["losetup", "-d", device], check=True)


@contextlib.contextmanager
def authenticated(device: str, work: Path, mode: str) -> Iterator[str]:
    """LUKS2 with authenticated encryption (dm-crypt over dm-integrity, HMAC-SHA256 per sector)
    on DEVICE, opened: a changed ciphertext sector fails its read, whatever the file system.
    MODE `journal` writes data and tags through dm-integrity's journal, `direct` without it."""
    key, name = work / "key", f"scatter-lab-{os.getpid()}"
    key.write_bytes(os.urandom(64))
    fast = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", str(key))
    # Wiped, so that every tag is valid (mkfs reads sectors it never wrote): give it a small image.
    run("cryptsetup", "luksFormat", "-q", "--type", "luks2", "--integrity", "hmac-sha256", "--sector-size", "4096",
        *fast, device)  # fmt: skip
    run("cryptsetup", "open", "--key-file", str(key), *(["--integrity-no-journal"] if mode == "direct" else []),
        device, name)  # fmt: skip
    try:
        yield f"/dev/mapper/{name}"
    finally:
        subprocess.run(["cryptsetup", "close", name], check=True)


THIN_POOL, THIN_VOLUME = f"scatter-lab-{os.getpid()}-pool", f"scatter-lab-{os.getpid()}-0"


@contextlib.contextmanager
def thin_volume(work: Path, data: str, block_kb: int) -> Iterator[tuple[str, str]]:
    """A dm-thin pool on DATA with its metadata on a loop device of its own, and a thin volume
    the size of DATA in it: yields (the volume's device, the metadata's loop device)."""
    metadata = work / "thin-metadata"
    with open(metadata, "wb") as f:
        f.truncate(256 << 20)  # zeroed: the pool formats an empty metadata device
    sectors = int(Path(f"/sys/block/{Path(data).name}/size").read_text())
    with loop(metadata) as metadata_device:
        # low water mark 0; skip_block_zeroing: the unwritten part of a newly provisioned block
        # is not zeroed (only what the file system writes is written)
        run("dmsetup", "create", THIN_POOL, "--table",
            f"0 {sectors} thin-pool {metadata_device} {data} {block_kb * 2} 0 1 skip_block_zeroing")  # fmt: skip
        try:
            run("dmsetup", "message", THIN_POOL, "0", "create_thin 0")
            run("dmsetup", "create", THIN_VOLUME, "--table", f"0 {sectors} thin /dev/mapper/{THIN_POOL} 0")
            try:
                yield f"/dev/mapper/{THIN_VOLUME}", metadata_device
            finally:
                subprocess.run(["dmsetup", "remove", THIN_VOLUME], check=True)
        finally:
            subprocess.run(["dmsetup", "remove", THIN_POOL], check=True)


def measure(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(bytes written, bytes read) per run, counted on the loop device (what crosses the link)."""
    with tempfile.TemporaryDirectory(dir=args.dir) as work, contextlib.ExitStack() as stack:
        image, mnt = Path(work) / "image", Path(work) / "mnt"
        mnt.mkdir()
        with open(image, "wb") as f:
            f.truncate(int(args.image_gb * 2**30))
        device = stack.enter_context(loop(image))
        measured = [device]
        if args.fs == "thin":
            device, metadata = stack.enter_context(thin_volume(Path(work), device, args.thin_block_kb))
            measured.append(metadata)
            # (inode tables and journal written now, not by a background thread during the runs)
            run("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0", device)
            run("mount", "-o", "noatime" + ("," + args.mount if args.mount else ""), device, str(mnt))
            stack.callback(subprocess.run, ["umount", str(mnt)], capture_output=True)
            return _runs(args, mnt, device, measured)
        if args.integrity != "none":
            device = stack.enter_context(authenticated(device, Path(work), args.integrity))
        if args.fs == "overlay" and args.upper != "btrfs":
            # (inode tables and journal written now; one inode per 4 KiB, for trees of small files)
            mkfs = (("mkfs.xfs", "-q", "-f") if args.upper == "xfs" else
                    ("mkfs.ext4", "-q", "-F", "-i", "4096", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0"))
            run(*mkfs, *shlex.split(args.mkfs), device)
            run("mount", "-o", "noatime" + ("," + args.mount if args.mount else ""), device, str(mnt))
        elif args.fs == "nilfs2":
            run("mkfs.nilfs2", "-q", "-f", "-b", "4096", *shlex.split(args.mkfs), device)
            run("mount", "-i", "-t", "nilfs2", *(["-o", args.mount] if args.mount else []), device, str(mnt))
        else:
            mkfs = list(commands.mkfs("btrfs", device))
            run(*mkfs[:-1], *shlex.split(args.mkfs), device)
            mount = list(commands.mount(device, str(mnt), "btrfs", readonly=False))
            options = mount[mount.index("-o") + 1] + ("," + args.mount if args.mount else "")
            run("mount", "-t", "btrfs", "-o", options, device, str(mnt))
        stack.callback(subprocess.run, ["umount", str(mnt)], capture_output=True)
        return _runs(args, mnt, device, measured)


def written(devices: list[str]) -> int:
    return sum(device_written(d) for d in devices)


def read(devices: list[str]) -> int:
    return sum(device_read(d) for d in devices)


def snapshot_after_change(args: argparse.Namespace, device: str, n: int) -> None:
    """nilfs2's and dm-thin's snapshot of the state a run leaves (btrfs snapshots before it)."""
    if args.fs == "nilfs2":
        run("mkcp", "-s", device)
    else:  # dm-thin: the file system frozen while the pool takes the snapshot
        run("dmsetup", "suspend", THIN_VOLUME)
        try:
            run("dmsetup", "message", THIN_POOL, "0", f"create_snap {n + 1} 0")
        finally:
            run("dmsetup", "resume", THIN_VOLUME)


def _runs(args: argparse.Namespace, mnt: Path, device: str, measured: list[str]) -> list[tuple[int, int]]:
    if args.fs == "overlay":
        return _layer_runs(args, mnt, measured)
    btrfs = args.fs == "btrfs"
    if btrfs:
        run("btrfs", "-q", "subvolume", "create", str(mnt / "s0"))
    else:
        (mnt / "s0").mkdir()
    write_tree(mnt / "s0", args.files, args.file_kb << 10)
    sync = ("btrfs", "filesystem", "sync", str(mnt)) if btrfs else ("sync", "-f", str(mnt))
    run(*sync)
    if not btrfs and args.snapshot:
        snapshot_after_change(args, device, 0)  # the first backup's snapshot
    rng, figures, last = random.Random(args.seed), [], "s0"
    for n in range(1, args.runs + 1):
        if btrfs and args.snapshot:
            run("btrfs", "property", "set", "-ts", str(mnt / last), "ro", "true")
        run(*sync)
        if args.cold:
            drop_caches()
        before = written(measured), read(measured)
        if btrfs and args.snapshot:
            run("btrfs", "-q", "subvolume", "snapshot", str(mnt / last), str(mnt / f"s{n}"))
            last = f"s{n}"
        change(mnt / last, rng, args)
        run(*sync)
        if not btrfs and args.snapshot:
            snapshot_after_change(args, device, n)
        figures.append((written(measured) - before[0], read(measured) - before[1]))
        if btrfs and args.snapshot and args.keep and n + 1 > args.keep:
            pruned = written(measured)
            oldest = n + 1 - args.keep - 1  # the snapshots s0..sN: keep the last KEEP
            run("btrfs", "-q", "subvolume", "delete", "--commit-after", str(mnt / f"s{oldest}"))
            run("btrfs", "subvolume", "sync", str(mnt))  # the cleaner has dropped its references
            run(*sync)
            print(f"after run {n}: snapshot s{oldest} deleted: {written(measured) - pruned:,} bytes written",
                  flush=True)  # fmt: skip
    return figures


def flush(mnt: Path) -> None:
    """Everything a run changed written in place, as the unmount at a run's end does: a sync
    commits ext4's journal and xfs's log, but their blocks' own places are written later, by
    the journal's checkpoint or the log's push; a freeze does both now."""
    run("fsfreeze", "--freeze", str(mnt))
    run("fsfreeze", "--unfreeze", str(mnt))


def _layer_runs(args: argparse.Namespace, mnt: Path, measured: list[str]) -> list[tuple[int, int]]:
    """--fs overlay: the tree in layer 0, each run's change in a layer of its own (or, without
    snapshots, in layer 0 itself: the file system's own cost of the change). With --keep, the
    oldest state is dropped by merging (cryptsnap.overlay.drop) once more are kept; at the end
    every kept state is mounted read-only as a restore would and compared with what it should
    hold."""
    stores, work, merged = mnt / "layers", mnt / "work", mnt.parent / "merged"
    overlay_layers.begin(stores)
    content = write_tree(stores / "0", args.files, args.file_kb << 10)
    flush(mnt)
    rng, figures, changes = random.Random(args.seed), [], {0: {}}
    for n in range(1, args.runs + 1):
        if args.cold:
            drop_caches()
        before = written(measured), read(measured)
        if args.snapshot:
            with overlay_layers.writable(stores, work, merged, n) as root:
                changes[n] = change(root, rng, args)
        else:
            changes[n] = change(stores / "0", rng, args)
        flush(mnt)
        figures.append((written(measured) - before[0], read(measured) - before[1]))
        while args.snapshot and args.keep and len(overlay_layers.kept(stores)) > args.keep:
            oldest = overlay_layers.kept(stores)[0]
            pruned = written(measured)
            overlay_layers.drop(stores, oldest)
            flush(mnt)
            print(f"after run {n}: the state after run {oldest} dropped, the next layer merged into it: "
                  f"{written(measured) - pruned:,} bytes written", flush=True)  # fmt: skip
    if args.snapshot:
        check_states(stores, mnt.parent / "restore", content, changes, overlay_layers.kept(stores), args)
    return figures


def check_states(stores: Path, where: Path, content: bytes, changes: dict[int, dict[int, bytes | None]],
                 kept: list[int], args: argparse.Namespace) -> None:  # fmt: skip
    """Every kept state, mounted read-only from its layers, holds each changed file as it was
    written by then (or as the tree made it; none if deleted), and one file no run changed."""
    touched = sorted({i for run_changes in changes.values() for i in run_changes})
    unchanged = next(i for i in range(args.files) if i not in touched)
    for n in kept:
        with overlay_layers.read_only(stores, n, where) as root:
            for i in [*touched, unchanged]:
                latest = [changes[k][i] for k in sorted(changes) if k <= n and i in changes[k]]
                want = latest[-1] if latest else original(content, i)
                path = root / file_path(i)
                if (path.read_bytes() if os.path.lexists(path) else None) != want:
                    raise RuntimeError(f"the state after run {n} does not hold {file_path(i)} as written")
    print(f"checked: the states after runs {', '.join(map(str, sorted(kept)))}, each mounted read-only "
          f"from its layers, hold what was written")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.scatter_lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--file-kb", type=int, default=4)
    parser.add_argument("--changed", type=int, default=30)
    parser.add_argument("--changed-kb", type=int, default=100)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--delete", type=int, default=0, help="files deleted a run, besides the changed ones")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--fs", choices=("btrfs", "nilfs2", "thin", "overlay"), default="btrfs",
                        help="thin: ext4 on a dm-thin volume, block-level snapshots; overlay: a layer a run (above)")
    parser.add_argument("--keep", type=int, default=0,
                        help="keep this many states, deleting the oldest snapshot or merging the oldest layer away "
                        "(0: all; btrfs and overlay)")
    parser.add_argument("--upper", choices=("ext4", "xfs", "btrfs"), default="ext4",
                        help="--fs overlay: the file system (btrfs: made and mounted as cryptsnap does, no snapshots)")
    parser.add_argument("--thin-block-kb", type=int, default=64, help="dm-thin's block (64 to 1 GiB; default 64)")
    parser.add_argument("--mkfs", default="", help="more mkfs options (btrfs: after cryptsnap's, they win)")
    parser.add_argument("--mount", default="", help="more mount options, after cryptsnap's")
    parser.add_argument("--no-snapshot", dest="snapshot", action="store_false",
                        help="change the files in place: what snapshots add")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each run; count reads")
    parser.add_argument("--integrity", choices=("none", "journal", "direct"), default="none",
                        help="the file system on LUKS2 with authenticated encryption (dm-integrity below dm-crypt), "
                        "tags written through its journal or directly; bytes still counted below it")
    parser.add_argument("--image-gb", type=float, default=4)
    parser.add_argument("--dir", default="/var/tmp", help="where the sparse image goes")
    args = parser.parse_args(argv)
    changed = args.changed * (args.changed_kb << 10)
    ratio = (lambda n: f": {n / changed:.3f}x") if changed else (lambda n: "")  # noqa: E731 (--changed 0: a snapshot alone)
    for n, (written, read) in enumerate(measure(args), 1):
        cold = f", {read:,} bytes read{ratio(read)}" if args.cold else ""
        print(f"run {n}: {written:,} bytes written for {changed:,} changed{ratio(written)}{cold}")


if __name__ == "__main__":
    main()
