"""Command builders are pure: the argv they return is what runs."""

from __future__ import annotations

import os
import shlex
import subprocess

from cryptsnap import commands, config
from cryptsnap.pipeline import parse_restore_spec
from tests.unit.test_config import GOOD

TARGET = config.parse(GOOD, "c.yaml").target("home")


def test_rsync_keeps_everything_and_links_to_the_previous_snapshot():
    argv = commands.rsync(["/etc", "/home"], "/fs/snapshots/new.partial", excludes=["*.tmp"],
                          link_dest="/fs/snapshots/old")  # fmt: skip
    assert argv[0] == "rsync"
    for flag in ("--archive", "--hard-links", "--acls", "--xattrs", "--sparse", "--numeric-ids", "--relative",
                 "--delete", "--one-file-system", "--link-dest=/fs/snapshots/old", "--exclude=*.tmp"):  # fmt: skip
        assert flag in argv
    assert argv[-3:] == ("/etc", "/home", "/fs/snapshots/new.partial/")
    assert "--inplace" not in argv


def test_rsync_btrfs_mode_is_inplace_without_link_dest():
    argv = commands.rsync(["/etc"], "/d", inplace=True, one_file_system=False, progress=False)
    assert "--inplace" in argv and "--one-file-system" not in argv
    assert not any(a.startswith("--link-dest") or a.startswith("--info") for a in argv)


def test_rsync_builds_the_whole_file_list_first_unless_told_to_list_as_it_goes():
    whole = commands.rsync(["/home"], "/d", inplace=True)
    assert "--info=progress2" in whole and "--no-inc-recursive" in whole  # its percentage counts the whole tree
    listed = commands.rsync(["/home"], "/d", inplace=True, incremental=True)
    assert "--info=progress2" in listed and "--no-inc-recursive" not in listed


def test_rsync_given_a_list_copies_only_those_paths_from_the_root():
    argv = commands.rsync(["/etc", "/home"], "/d", inplace=True, excludes=["*.tmp"], files_from="/run/x/changed")
    assert "--files-from=/run/x/changed" in argv and "--from0" in argv and "--relative" in argv
    assert argv[-2:] == ("/", "/d/")  # listed paths are relative to /: sources keep their full paths
    assert "--delete" not in argv and "--exclude=*.tmp" in argv  # deletions are the caller's; excludes still hold
    assert "--delete-missing-args" in argv and "--force" in argv  # but a path gone since the scan goes


def test_rsync_of_files_whose_content_is_known_the_same_sets_only_their_attributes():
    argv = commands.rsync(["/home"], "/d", inplace=True, files_from="/run/x/touched", size_only=True, progress=False)
    assert "--size-only" in argv and "--files-from=/run/x/touched" in argv
    assert "--size-only" not in commands.rsync(["/home"], "/d", inplace=True)


def test_rsync_into_btrfs_compares_times_to_the_nanosecond():
    """Its quick check otherwise compares whole seconds (tests/host/test_same_content.py)."""
    assert "--modify-window=-1" in commands.rsync(["/home"], "/d", inplace=True, exact_times=True)
    assert not any(a.startswith("--modify-window") for a in commands.rsync(["/home"], "/d", link_dest="/p"))


def test_rsync_copies_without_its_transfer_checksum_and_the_copy_is_whole(tmp_path):
    """Both ends are local: the checksum compared only the two ends of a pipe, and cost up to
    half of rsync's processor time. Run for real, as the backup and the restore build it."""
    source = tmp_path / "src" / "home"
    (source / "d").mkdir(parents=True)
    content = {"a": os.urandom(300_000), "d/b": b"small", "empty": b""}
    for name, data in content.items():
        (source / name).write_bytes(data)
    backup = commands.rsync([str(source)], str(tmp_path / "snap"), inplace=True, progress=False, one_file_system=False)
    restore = commands.rsync_restore(f"{tmp_path / 'snap'}{source}/", str(tmp_path / "back") + "/")
    for argv in (backup, restore):
        assert "--checksum-choice=none" in argv
        done = subprocess.run([argv[0], "--debug=nstr", *argv[1:]], capture_output=True, text=True, check=True)
        assert "checksum: none" in done.stdout, done.stdout  # what rsync itself says it used
    for name, data in content.items():
        assert (tmp_path / "back" / name).read_bytes() == data


def test_the_backup_rewrites_a_changed_file_whole_so_a_zeroed_tail_is_copied(tmp_path):
    """rsync before 3.3.0 (Debian bookworm's 3.2.7-1+deb12u6, tried) with --sparse --inplace
    and its delta transfer leaves the old bytes where a file's tail became zeros or a hole:
    the snapshot would keep data its source no longer holds. Whole-file copies (rsync's way
    between local paths, and what --checksum-choice=none forces) are not affected; this holds
    the backup to them: no byte of a changed file comes from the snapshot's old copy."""
    source = tmp_path / "src" / "home"
    source.mkdir(parents=True)
    zeroed, holed = source / "zeroed.img", source / "holed.img"
    for path in (zeroed, holed):
        path.write_bytes(os.urandom(1 << 20))
    argv = commands.rsync([str(source)], str(tmp_path / "snap"), inplace=True, progress=False,
                          one_file_system=False, exact_times=True)  # fmt: skip
    subprocess.run(argv, check=True)
    with zeroed.open("r+b") as f:  # a rewritten image, a database's freed pages: same size
        f.seek(512 << 10)
        f.write(bytes(512 << 10))
    os.truncate(holed, 256 << 10)
    os.truncate(holed, 1 << 20)
    for path in (zeroed, holed):
        os.utime(path, (1, 1))
    done = subprocess.run([*argv[:-2], "--stats", *argv[-2:]], capture_output=True, text=True, check=True)
    assert "Matched data: 0 bytes" in done.stdout, done.stdout  # nothing reused from the old copy
    for path in (zeroed, holed):
        assert (tmp_path / "snap" / path.relative_to("/")).read_bytes() == path.read_bytes()


def test_ssh_config_pins_the_host_key_and_ignores_user_config():
    text = commands.ssh_config(TARGET, "/var/lib/cryptsnap/home/known_hosts")
    assert "Host cryptsnap-home\n" in text
    for line in ("HostName backup.example.org", "User backup", "IdentitiesOnly yes", "BatchMode yes",
                 "StrictHostKeyChecking yes", "UserKnownHostsFile /var/lib/cryptsnap/home/known_hosts",
                 "GlobalKnownHostsFile /dev/null", "ServerAliveInterval 15", "HostKeyAlias cryptsnap-home"):  # fmt: skip
        assert f"    {line}\n" in text


def test_sshfs_uses_our_ssh_config_and_contains_symlinks():
    argv = commands.sshfs("/state/ssh_config", TARGET, "/run/cryptsnap/home/remote", contain_symlinks=True)
    assert argv[:5] == ("sshfs", "-F", "/state/ssh_config", "cryptsnap-home:cryptsnap", "/run/cryptsnap/home/remote")
    options = argv[-1].split(",")
    assert {"nodev", "nosuid", "noexec", "contain_symlinks", "idmap=none"} <= set(options)
    assert "contain_symlinks" not in commands.sshfs("/c", TARGET, "/m", contain_symlinks=False)[-1]


def test_ssh_quotes_the_remote_command_once():
    argv = commands.ssh("/c", TARGET, ["mkdir", "-p", "--", "dir with space; rm -rf /"])
    assert argv[:4] == ("ssh", "-F", "/c", "cryptsnap-home")
    assert shlex.split(argv[-1]) == ["mkdir", "-p", "--", "dir with space; rm -rf /"]


def test_luks_and_loop_and_mount_builders():
    fmt = commands.luks_format("/dev/loop0", "/k", "pbkdf2", 1000)
    assert fmt[:2] == ("cryptsetup", "luksFormat") and fmt[-1] == "/dev/loop0"
    assert "--sector-size" in fmt and fmt[fmt.index("--sector-size") + 1] == "4096"
    assert fmt[fmt.index("--type") + 1] == "luks2" and "--pbkdf-force-iterations" in fmt
    assert "--pbkdf-force-iterations" not in commands.luks_format("/dev/loop0", "/k", "argon2id", None)
    assert commands.luks_open("/dev/loop0", "cryptsnap-home", "/k", readonly=True)[-3:] == (
        "--readonly", "/dev/loop0", "cryptsnap-home")
    assert commands.luks_close("cryptsnap-home", "/state/h.img") == ("cryptsetup", "close", "--header", "/state/h.img",
                                                                     "cryptsnap-home")  # fmt: skip
    with_header = commands.luks_open("/dev/loop0", "cryptsnap-home", "/k", readonly=False, header="/state/h.img")
    assert with_header[with_header.index("--header") + 1] == "/state/h.img" and "--readonly" not in with_header
    assert commands.loop_attach("/dev/fd/4", readonly=True) == ("losetup", "--find", "--show", "--direct-io=on",
                                                                  "--read-only", "/dev/fd/4")
    rw = commands.mount("/dev/mapper/x", "/m", "btrfs", readonly=False)
    assert rw[rw.index("-o") + 1] == "nodev,nosuid,noatime,compress=zstd:1,commit=300"
    ro = commands.mount("/dev/mapper/x", "/m", "ext2", readonly=True)
    assert ro == ("mount", "-t", "ext2", "-o", "nodev,nosuid,noatime,ro", "/dev/mapper/x", "/m")
    assert commands.mkfs("ext2", "/dev/mapper/x") == ("mkfs.ext2", "-q", "-F", "-L", "cryptsnap", "/dev/mapper/x")
    assert commands.grow_filesystem("btrfs", "/m", "/dev/mapper/x") == ("btrfs", "filesystem", "resize", "max", "/m")
    assert commands.grow_filesystem("ext2", "/m", "/dev/mapper/x") == ("resize2fs", "/dev/mapper/x")
    btrfs = commands.mkfs("btrfs", "/dev/mapper/x")
    assert btrfs[btrfs.index("--csum") + 1] == "xxhash" and btrfs[-1] == "/dev/mapper/x"  # 64-bit checksums


def test_every_program_has_a_package_for_the_missing_tool_message():
    built = [commands.keyscan(TARGET), commands.fingerprints("/k"), commands.fuse_unmount("/m"),
             commands.loop_list(), commands.luks_dump("/d"), commands.luks_header_backup("/d", "/b"),
             commands.mkfs("btrfs", "/d"), commands.btrfs_snapshot("/a", "/b"),
             commands.unmount("/m"), commands.rsync_restore("/a", "/b")]  # fmt: skip
    for argv in built:
        assert argv[0] in commands.PACKAGES


def test_restore_spec():
    assert parse_restore_spec("home@latest:/etc/fstab") == ("home", "latest", "/etc/fstab")
    assert parse_restore_spec("home:/etc") == ("home", "latest", "/etc")
    assert parse_restore_spec("home@2026-11:/") == ("home", "2026-11", "/")
    for bad in ("home", "home:etc", "home:/etc/../../x"):
        try:
            parse_restore_spec(bad)
        except Exception as exc:
            assert exc.exit_code == 2
        else:
            raise AssertionError(bad)


def test_a_failed_mount_is_called_damage_only_from_the_kernels_messages_about_that_device():
    from cryptsnap.layers import damage_reported

    messages = ["BTRFS info (device dm-7): using xxhash64 (xxhash64-generic) checksum algorithm",
                "BTRFS error (device dm-7 state EA): bad tree block start, mirror 1 want 30572544 have 0",
                "BTRFS error (device dm-17): checksum verify failed on logical 1052672",
                "BTRFS error (device dm-7): open_ctree failed: -5"]  # fmt: skip
    assert damage_reported("/dev/dm-7", messages) == "; ".join([messages[1], messages[3]])
    assert damage_reported("/dev/dm-17", messages) == messages[2]
    assert damage_reported("/dev/dm-3", messages) == ""
    assert damage_reported("/dev/dm-7", messages[:1]) == ""  # a mount that failed for another reason


def test_ssh_config_puts_the_bandwidth_limits_on_the_meter_relay():
    import dataclasses

    plain = commands.ssh_config(TARGET, "/k", counter="/run/t")
    assert "ProxyCommand /usr/bin/python3 -m cryptsnap.meter --counter /run/t %h %p\n" in plain
    limited = commands.ssh_config(dataclasses.replace(TARGET, upload_limit=512, download_limit=2048), "/k",
                                  counter="/run/t")  # fmt: skip
    assert "-m cryptsnap.meter --counter /run/t --up-limit 512 --down-limit 2048 %h %p\n" in limited
