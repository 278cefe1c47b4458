"""Server-side damage to the image's metadata: ciphertext changed where btrfs keeps its trees.

The header area and data blocks have their own tests (test_faults: the header zeroed or
changed; test_pipeline: a data block found by `check`). Metadata is the case the local block
cache could hide: backups read it from the cache, so only `check` comparing the server's copy
with the cache sees the damage, and only this machine's copy can mend it.
"""

from __future__ import annotations

import os
import re
import subprocess

import yaml

from cryptsnap.blockcache import Store
from tests.support import trees
from tests.support.checks import assert_nothing_left, cryptsnap
from tests.support.targets import init_target, make_setup
from tests.system.test_pipeline import flip, remote_image

OOPS = re.compile(r"BUG:|Oops|general protection fault|kernel BUG|Call Trace", re.I)


def use_cache(setup, on: bool) -> None:
    document = yaml.safe_load(setup.config_path.read_text())
    document["targets"][setup.name]["metadata_cache"] = on
    setup.config_path.write_text(yaml.safe_dump(document))


def cached_metadata_blocks(setup) -> list[int]:
    """Image offsets of the blocks the cache holds inside the file system's metadata ranges,
    past the LUKS header and the btrfs superblock (the cache's anchor: a changed anchor is
    "out of date", and btrfs checks the superblock itself at mount)."""
    state = setup.state_dir / setup.name
    image = yaml.safe_load((state / "image.json").read_text())
    store = Store(state / "block-cache", f"{image['luks_uuid']}:{image['size']}", image["size"])
    saved = store.load_saved()
    assert isinstance(saved, dict), saved
    anchor = saved["anchor"]
    ranges = [(s, e) for s, e in saved["ranges"] if s >= 1 << 20]
    return [offset for run, length in store.held_runs(1 << 20, 1 << 30)
            for offset in range(run, run + length, 4096)
            if offset != anchor and any(s <= offset < e for s, e in ranges)]  # fmt: skip


def kernel_log() -> str:
    return subprocess.run(["dmesg"], capture_output=True, text=True).stdout


def test_damaged_metadata_is_found_by_check_mended_from_this_machines_copy_and_refused_cold(tmp_path, untrusted_host):
    setup = make_setup(tmp_path, untrusted_host, size="200M")
    for d in range(8):
        (setup.source / f"d{d}").mkdir()
        for f in range(30):
            (setup.source / f"d{d}" / f"f{f:02}").write_bytes(os.urandom(8192))
    init_target(setup)
    cryptsnap(setup, "backup", setup.name)
    (setup.source / "d0" / "late").write_text("second snapshot\n")
    cryptsnap(setup, "backup", setup.name)
    held = trees.manifest(setup.source)
    oopses_before = len(OOPS.findall(kernel_log()))

    out = cryptsnap(setup, "check", setup.name, "--fraction", "1").stdout
    assert re.search(r"metadata cache: \d+ blocks compared with the server's copy: identical", out), out
    blocks = cached_metadata_blocks(setup)
    assert len(blocks) > 20, blocks
    image = remote_image(setup)
    for offset in blocks:  # the server changes every metadata block this machine caches
        flip(image, offset + 100)

    # A warm backup would not notice (it reads this machine's copy); check does, and says what to do.
    failed = cryptsnap(setup, "check", setup.name, "--fraction", "1", expect=7)
    said = failed.stdout + failed.stderr
    assert f"{len(blocks)} of the" in said and "differ on the server from this machine's copy" in said, said
    assert f"cryptsnap check {setup.name} --repair" in said, said
    assert_nothing_left(setup)

    repaired = cryptsnap(setup, "check", setup.name, "--fraction", "1", "--repair").stdout
    assert f"repaired {len(blocks)} blocks" in repaired, repaired
    cryptsnap(setup, "check", setup.name, "--fraction", "1")
    # The server's copy alone is whole again: a run without the cache reads only it.
    use_cache(setup, False)
    cryptsnap(setup, "backup", setup.name)
    for name in cryptsnap(setup, "list", setup.name).stdout.split()[-1:]:
        got = tmp_path / f"restored-{name}"
        cryptsnap(setup, "restore", f"{setup.name}@{name}:{setup.source}", "--to", str(got))
        assert trees.manifest(got) == held
    assert_nothing_left(setup)

    # Damaged again, with no current copy on this machine (the run without the cache made
    # it out of date): the next run reads the server's copy, and refuses it before writing.
    use_cache(setup, True)
    for offset in blocks:
        flip(image, offset + 100)
    note = cryptsnap(setup, "check", setup.name, "--fraction", "1", expect=None)
    print("check over damaged metadata, no current cache:", note.returncode, note.stdout, note.stderr)
    before = image.read_bytes()
    run = cryptsnap(setup, "backup", setup.name, expect=None)
    print("backup over damaged metadata:", run.returncode, run.stderr)
    assert run.returncode == 7, run.stderr
    assert image.read_bytes() == before, "a backup over damaged metadata wrote to the image"
    assert_nothing_left(setup)
    assert len(OOPS.findall(kernel_log())) == oopses_before, kernel_log()[-3000:]


def test_a_backup_through_cryptsnapd_over_damaged_metadata_is_refused_by_name(service):
    """The installed service (its hardening included) reads the kernel's reasons for a failed
    mount too: the job ends as an integrity error, exit 7, naming the damage."""
    import shutil

    from cryptsnap.bus import target_path
    from tests.support.service import prop

    cryptsnap(service, "backup", service.name)  # through cryptsnapd: the default configuration
    (service.source / "more").write_text("a second run, so the cache holds what it reads and writes\n")
    cryptsnap(service, "backup", service.name)
    blocks = cached_metadata_blocks(service)
    image = remote_image(service)
    for offset in blocks:
        flip(image, offset + 100)
    shutil.rmtree(service.state_dir / service.name / "block-cache")  # no copy here: the server's is read
    failed = cryptsnap(service, "backup", service.name, expect=7)
    assert "file system in the image is damaged" in failed.stderr and "BTRFS" in failed.stderr, failed.stderr
    target = target_path(service.name)
    assert prop(target, "org.cryptsnap1.Target", "LastExitCode") == 7
    assert "damaged" in prop(target, "org.cryptsnap1.Target", "LastError")
    assert_nothing_left(service)
