"""Pure builders of the external commands cryptsnap runs. Each returns an argv tuple.

Nothing here runs anything or looks at the system; runner.py executes what these build,
so every command a user might want to reproduce is visible and testable as data.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable, Sequence

from .config import Target

Argv = tuple[str, ...]

# Which Debian package provides each program, for "install it with" messages.
PACKAGES = {
    "ssh": "openssh-client",
    "ssh-keyscan": "openssh-client",
    "ssh-keygen": "openssh-client",
    "sftp": "openssh-client",
    "sshfs": "sshfs",
    "fusermount3": "fuse3",
    "losetup": "util-linux",
    "mount": "mount",
    "umount": "mount",
    "cryptsetup": "cryptsetup-bin",
    "dmsetup": "dmsetup",
    "mkfs.btrfs": "btrfs-progs",
    "btrfs": "btrfs-progs",
    "mkfs.ext2": "e2fsprogs",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "resize2fs": "e2fsprogs",
    "rsync": "rsync",
    "modprobe": "kmod",
}

LUKS_SECTOR_SIZE = 4096
LABEL = "cryptsnap"


def ssh_config(target: Target, known_hosts: str, counter: str | None = None, python: str = "/usr/bin/python3") -> str:
    """cryptsnap's own ssh configuration for a target: nothing from ~/.ssh/config applies.

    With a counter file, ssh connects through cryptsnap.meter, which counts every byte.
    """
    options = {
        "HostName": target.host,
        "Port": str(target.port),
        "User": target.user,
        "IdentityFile": target.identity_file,
        "IdentitiesOnly": "yes",
        "BatchMode": "yes",
        "PasswordAuthentication": "no",
        "KbdInteractiveAuthentication": "no",
        "StrictHostKeyChecking": "yes",
        "UserKnownHostsFile": known_hosts,
        "GlobalKnownHostsFile": "/dev/null",
        "UpdateHostKeys": "no",
        "HostKeyAlias": f"cryptsnap-{target.name}",
        "ServerAliveInterval": str(target.alive_interval),
        "ServerAliveCountMax": str(target.alive_count),
        "ConnectTimeout": "20",
        "ForwardAgent": "no",
        "ForwardX11": "no",
        "ClearAllForwardings": "yes",
        "LogLevel": "ERROR",
    }
    if counter:
        limits = "".join(f" --{way}-limit {kib}" for way, kib in (("up", target.upload_limit),
                                                                   ("down", target.download_limit)) if kib)  # fmt: skip
        options["ProxyCommand"] = f"{python} -m cryptsnap.meter --counter {counter}{limits} %h %p"
    body = "".join(f"    {key} {value}\n" for key, value in options.items())
    header = f"# written by cryptsnap for target {target.name}; regenerated on every run\n"
    return f"{header}Host cryptsnap-{target.name}\n{body}"


def ssh_host(target: Target) -> str:
    return f"cryptsnap-{target.name}"  # the Host entry of ssh_config()


def ssh(config_file: str, target: Target, remote_argv: Sequence[str]) -> Argv:
    # ssh joins its arguments into one shell command line on the server: quote them here.
    return ("ssh", "-F", config_file, ssh_host(target), "--", shlex.join(remote_argv))


def sftp_probe(config_file: str, target: Target) -> Argv:
    """An SFTP session that does nothing (batch from empty stdin); -vv lists the server's extensions."""
    return ("sftp", "-F", config_file, "-vv", "-b", "-", ssh_host(target))


def sftp_batch(config_file: str, target: Target) -> Argv:
    """An SFTP session running the batch of commands given on stdin (for accounts without a shell)."""
    return ("sftp", "-F", config_file, "-b", "-", ssh_host(target))


def sftp_mkdirs(path: str) -> str:
    """The sftp batch that makes `path` and its parents; "-" ignores an error (one that exists)."""
    parts = [p for p in path.split("/") if p]
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    lead = "/" if path.startswith("/") else ""
    return "".join(f'-mkdir "{lead}{prefix}"\n' for prefix in prefixes)


def keyscan(target: Target) -> Argv:
    return ("ssh-keyscan", "-T", "20", "-p", str(target.port), "-t", "ed25519,ecdsa,rsa", target.host)


def fingerprints(known_hosts: str) -> Argv:
    return ("ssh-keygen", "-l", "-f", known_hosts)


def sshfs(config_file: str, target: Target, mountpoint: str, contain_symlinks: bool,
          ssh_log: str | None = None) -> Argv:  # fmt: skip
    """ssh_log: where ssh writes its messages (sshfs detaches from the terminal and drops them),
    so a connection lost mid-run can be explained in ssh's own words."""
    options = [
        "idmap=none",
        "nodev",
        "nosuid",
        "noexec",
        # The image is one big file used as a block device: never serve stale pages.
        "cache=no",
    ]
    if contain_symlinks:
        options.append("contain_symlinks")  # a hostile server's absolute symlinks stay inside the mount
    argv = ("sshfs", "-F", config_file, f"{ssh_host(target)}:{target.remote_dir}", mountpoint,
            "-o", ",".join(options))  # fmt: skip
    if ssh_log:  # sshfs splits ssh_command at spaces; INFO has "Timeout, server not responding"
        argv += ("-o", f"ssh_command=ssh -E {ssh_log} -o LogLevel=INFO")
    return argv


def fuse_unmount(mountpoint: str) -> Argv:
    return ("fusermount3", "-u", "-z", mountpoint)


def loop_attach(path: str, readonly: bool) -> Argv:
    # Direct I/O: the image's blocks are cached once (above dm-crypt), not again in the
    # sshfs file, whose FUSE page cache may hold only ~1% of dirty memory ("strictlimit"):
    # buffered, a large flush crawled at a fraction of the link's speed (docs/performance.md).
    return ("losetup", "--find", "--show", "--direct-io=on", *(["--read-only"] if readonly else []), path)


def loop_detach(device: str) -> Argv:
    return ("losetup", "--detach", device)


def loop_list() -> Argv:
    return ("losetup", "--list", "--json", "--output", "NAME,BACK-FILE,RO")


def luks_format(device: str, key_file: str, pbkdf: str, iterations: int | None) -> Argv:
    argv = [
        "cryptsetup", "luksFormat", "--batch-mode", "--type", "luks2",
        "--sector-size", str(LUKS_SECTOR_SIZE), "--cipher", "aes-xts-plain64", "--key-size", "512",
        "--pbkdf", pbkdf, "--label", LABEL, "--key-file", key_file,
    ]  # fmt: skip
    if iterations is not None:
        argv += ["--pbkdf-force-iterations", str(iterations)]
    return (*argv, device)


def luks_open(device: str, name: str, key_file: str, readonly: bool, header: str | None = None) -> Argv:
    # --header: unlock with the local copy of the header instead of reading it (and the
    # ~256 KiB key slot area) from the server on every run; it is the same header.
    return ("cryptsetup", "open", "--type", "luks2", "--key-file", key_file,
            *(["--header", header] if header else []),
            *(["--readonly"] if readonly else []), device, name)  # fmt: skip


def luks_close(name: str, header: str | None = None) -> Argv:
    # --header: without it, close reads the LUKS header from the image again (~36 KB down).
    return ("cryptsetup", "close", *(["--header", header] if header else []), name)


def dm_info(name: str) -> Argv:
    """Exit 0 when a device-mapper device of this name exists, with a table or not."""
    return ("dmsetup", "info", name)


def dm_remove(name: str) -> Argv:
    """Remove a device-mapper device by name, with or without a table."""
    return ("dmsetup", "remove", "--retry", name)


def luks_dump(device: str) -> Argv:
    return ("cryptsetup", "luksDump", device)


def luks_metadata(device: str) -> Argv:
    return ("cryptsetup", "luksDump", "--dump-json-metadata", device)


def luks_uuid(device: str) -> Argv:
    return ("cryptsetup", "luksUUID", device)


def luks_header_backup(device: str, backup_file: str) -> Argv:
    return ("cryptsetup", "luksHeaderBackup", device, "--header-backup-file", backup_file)


def mkfs(filesystem: str, device: str) -> Argv:
    if filesystem == "btrfs":
        # 4 KiB metadata nodes and no duplicated metadata: a changed file rewrites far fewer
        # bytes of tree on the remote side (see docs/performance.md). xxhash64 checksums: a
        # block the host changed goes unseen with odds 2^-64, not crc32c's 2^-32 (docs/design.md,
        # "What each checksum protects against a hostile host").
        return ("mkfs.btrfs", "-q", "-f", "-L", LABEL, "-n", "4096", "-m", "single", "-d", "single",
                "--csum", "xxhash", device)  # fmt: skip
    return (f"mkfs.{filesystem}", "-q", "-F", "-L", LABEL, device)


def grow_filesystem(filesystem: str, mountpoint: str, device: str) -> Argv:
    """Grow a mounted file system to its device's size (both work online)."""
    if filesystem == "btrfs":
        return ("btrfs", "filesystem", "resize", "max", mountpoint)
    return ("resize2fs", device)


def fsck_preen(device: str, filesystem: str) -> Argv | None:
    """Before an ext2/ext4 file system is mounted to be written: ext2 has no journal, so a run
    cut short (a lost connection, a kill) can leave it inconsistent. `e2fsck -p` checks only a
    file system not marked clean, and repairs only what is safe without asking. btrfs needs
    nothing: each commit is complete or absent."""
    return ("e2fsck", "-p", device) if filesystem in ("ext2", "ext4") else None


def mount(device: str, mountpoint: str, filesystem: str, readonly: bool) -> Argv:
    options = ["nodev", "nosuid", "noatime"]
    if readonly:
        options.append("ro")
    elif filesystem == "btrfs":
        options.append("compress=zstd:1")  # compress before encryption: less to upload
        # One transaction for the whole sync where it can: each periodic commit (default 30 s)
        # writes the path of tree nodes above every change again (docs/performance.md).
        # The run ends with its own sync.
        options.append("commit=300")
    return ("mount", "-t", filesystem, "-o", ",".join(options), device, mountpoint)


def mount_overlay(options: str, mountpoint: str) -> Argv:
    """overlayfs's layers as OPTIONS name them (relative to the directory it runs in: the
    kernel takes one page of options; cryptsnap.overlay)."""
    return ("mount", "-t", "overlay", "overlay", "-o", options, mountpoint)


def bind_mount(source: str, mountpoint: str) -> Argv:
    return ("mount", "--bind", source, mountpoint)


def mount_tmpfs(mountpoint: str) -> Argv:
    """A small memory file system for mount points in a read-only image (a layered view)."""
    return ("mount", "-t", "tmpfs", "-o", "mode=0700,nodev,nosuid,noexec,size=4m", "tmpfs", mountpoint)


def remount_flushoncommit(mountpoint: str) -> Argv:
    """Every commit from here on (the periodic ones too) takes the data written before it
    along, so what a commit shows was written whole (cryptsnap.snapshot.Unfinished)."""
    return ("mount", "-o", "remount,flushoncommit", mountpoint)


def remount_rw(mountpoint: str) -> Argv:
    """A file system mounted read-only until the run knows it has something to write (FsMount)."""
    return ("mount", "-o", "remount,rw", mountpoint)


def unmount(mountpoint: str) -> Argv:
    return ("umount", mountpoint)


# Both ends of every copy are local (the snapshot is a mounted file system), so rsync copies
# files whole and its transfer checksum only compares what its sender read with what its
# receiver got through a pipe: no protection against the host, which sees only encrypted
# blocks below btrfs's own checksums. Without it rsync takes half the processor time in a
# restore and a fifth to a third less in a backup (docs/performance.md, "rsync's transfer
# checksum: off"). Copying whole files also keeps the backup clear of rsync's --sparse
# --inplace bug before 3.3.0 (a delta transfer left a zeroed tail's old bytes in place).
RSYNC_PARTIAL = 23  # rsync's exit status when some files or attributes were not transferred
RSYNC_VANISHED = 24  # rsync's exit status when source files vanished before it could read them
RSYNC_LOCAL_COPY = ("rsync", "--archive", "--hard-links", "--acls", "--xattrs", "--sparse", "--numeric-ids",
                    "--checksum-choice=none")  # fmt: skip


def rsync(
    sources: Iterable[str],
    destination: str,
    *,
    excludes: Iterable[str] = (),
    one_file_system: bool = True,
    link_dest: str | None = None,
    inplace: bool = False,
    progress: bool = True,
    files_from: str | None = None,
    incremental: bool = False,
    size_only: bool = False,
    exact_times: bool = False,
) -> Argv:
    """Copy sources into the snapshot; with files_from, only the NUL-separated paths listed there.

    files_from paths are relative to /, and rsync does not recurse into listed directories:
    the caller lists every entry to copy and deletes vanished ones itself (cryptsnap.changes).
    A listed path that is gone by the time rsync looks is deleted from the destination.

    With progress, rsync builds the whole file list first (--no-inc-recursive) so that its
    percentage counts the whole tree: 199 MiB of rsync at 10^6 files. With `incremental` it
    lists directories as it goes (17 MiB), and its percentage counts only the files found so
    far: the caller then measures the fraction against a total of its own.

    size_only: a file of the same size is taken as the same (the caller compared the
    content): rsync sends no data for it and sets its times, mode, owner, ACLs and xattrs.

    exact_times: compare mtimes to the nanosecond (the snapshot's file system keeps them:
    btrfs). rsync's own quick check compares whole seconds: a file rewritten with its size
    within the second its last backup saw would be skipped, and its old bytes kept.
    """
    argv = [*RSYNC_LOCAL_COPY, "--relative"]  # --relative: /etc/fstab lands at SNAPSHOT/etc/fstab
    if files_from:
        # A listed path deleted here since the scan (a temporary file, a cache entry) is
        # deleted from the snapshot too, not an error that fails the run.
        argv += [f"--files-from={files_from}", "--from0", "--delete-missing-args", "--force"]
        sources = ["/"]
    else:
        argv += ["--delete", "--delete-excluded"]
    if one_file_system:
        argv.append("--one-file-system")
    if link_dest:
        argv.append(f"--link-dest={link_dest}")
    if inplace:
        argv.append("--inplace")  # rewrite changed files in place: the snapshot shares the rest
    if size_only:
        argv.append("--size-only")
    if exact_times:
        argv.append("--modify-window=-1")
    if progress:
        argv += ["--info=progress2"] if incremental else ["--info=progress2", "--no-inc-recursive"]
    argv += [f"--exclude={pattern}" for pattern in excludes]
    return (*argv, *sources, destination.rstrip("/") + "/")


def rsync_restore(source: str, destination: str, progress: bool = False) -> Argv:
    """progress: the bytes copied so far on stdout (what readahead.ReadAhead keeps ahead of)."""
    return (*RSYNC_LOCAL_COPY, *(["--info=progress2"] if progress else []), source, destination)


def btrfs_subvolume_create(path: str) -> Argv:
    return ("btrfs", "-q", "subvolume", "create", path)


def btrfs_snapshot(source: str, path: str) -> Argv:
    return ("btrfs", "-q", "subvolume", "snapshot", source, path)


def btrfs_subvolume_delete(path: str) -> Argv:
    return ("btrfs", "-q", "subvolume", "delete", path)


def btrfs_subvolume_sync(fs: str) -> Argv:
    """Wait until deleted subvolumes are cleaned up: only then is their room free."""
    return ("btrfs", "-q", "subvolume", "sync", fs)


def btrfs_set_readonly(path: str) -> Argv:
    return ("btrfs", "property", "set", "-ts", path, "ro", "true")


def sync(path: str) -> Argv:
    return ("sync", "--file-system", path)
