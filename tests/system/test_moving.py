"""A target moved to a new server as docs/moving.md says: the image copied, the configuration
changed, the new host key pinned by `init --accept-new-host-key`; the snapshots are all
there and backups go on, with the metadata cache still valid."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.support import sshd
from tests.support.checks import assert_nothing_left, cryptsnap
from tests.support.runs import digests, with_one_snapshot


@pytest.mark.long  # make test: init --accept-new-host-key in tests/host/test_init_existing.py
def test_a_target_moved_to_a_new_server_keeps_its_snapshots_and_goes_on(tmp_path, untrusted_host):
    setup, before = with_one_snapshot(tmp_path, untrusted_host)
    new = sshd.start()
    try:
        Path(new.remote_dir).mkdir()
        shutil.chown(new.remote_dir, new.user, new.user)
        moved = Path(new.remote_dir) / f"{setup.name}.img"
        shutil.copyfile(Path(untrusted_host.remote_dir) / f"{setup.name}.img", moved)  # step 2: the copy
        shutil.chown(moved, new.user, new.user)
        (Path(untrusted_host.remote_dir) / f"{setup.name}.img").unlink()  # the old server is gone
        document = yaml.safe_load(setup.config_path.read_text())  # step 3
        document["targets"][setup.name].update(port=new.port, identity_file=str(new.identity),
                                               remote_dir=Path(new.remote_dir).name)  # fmt: skip
        setup.config_path.write_text(yaml.safe_dump(document))
        refused = cryptsnap(setup, "backup", setup.name, expect=7)
        assert "is not the one pinned" in refused.stderr, refused.stderr
        kept = cryptsnap(setup, "init", "--accept-new-host-key", setup.name)  # step 4
        assert "kept as it is" in kept.stdout, kept.stdout
        checked = cryptsnap(setup, "check", setup.name)  # step 5
        assert "identical" in checked.stdout, checked.stdout
        (setup.source / "after the move").write_text("on the new server\n")
        ran = cryptsnap(setup, "-v", "backup", setup.name)
        assert "from the local record" in ran.stderr or "entries changed" in ran.stderr, ran.stderr
        after = digests(setup)
        assert len(after) == 2 and {name: after[name] for name in before} == before
        assert_nothing_left(setup)
    finally:
        sshd.stop(new)
