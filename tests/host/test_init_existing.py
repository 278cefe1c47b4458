"""`cryptsnap init` where an image already is: this target's own is kept (init run again, or
the image moved to a new server and the host key pinned anew, docs/moving.md); any other is
refused without --force, untouched. (The guest tier backs up to a moved image.)"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import yaml

from tests.host.test_layers import prepare
from tests.support import sshd
from tests.support.checks import assert_nothing_left, cryptsnap


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def records(state) -> tuple[str, int]:
    return state.image_file.read_text(), state.generation()


def test_init_again_keeps_this_targets_image_and_refuses_any_other(setup):
    target, state, paths = prepare(setup)  # allocated, LUKS-formatted, recorded: as `init` leaves it
    image = Path(setup.server.remote_dir) / target.image
    state.set_generation(5)  # as after five runs
    before, recorded = digest(image), records(state)
    kept = cryptsnap(setup, "init", setup.name)
    assert "is already this target's image" in kept.stdout and "kept as it is" in kept.stdout, kept.stdout
    assert digest(image) == before and records(state) == recorded
    assert_nothing_left(setup)

    with open(image, "r+b") as f:  # another image under the same name: another LUKS header
        f.seek(200)
        f.write(b"another image")
    other = digest(image)
    refused = cryptsnap(setup, "init", setup.name, expect=2)
    assert "is not the image this machine made" in refused.stderr and "--force" in refused.stderr, refused.stderr
    assert digest(image) == other and records(state) == recorded
    assert_nothing_left(setup)


def test_a_moved_image_is_refused_until_the_new_host_key_is_pinned_then_kept(setup):
    target, state, paths = prepare(setup)
    state.set_generation(3)
    recorded = records(state)
    new = sshd.start()  # the new server: its own host key, account and directory
    try:
        Path(new.remote_dir).mkdir()
        shutil.chown(new.remote_dir, new.user, new.user)
        moved = Path(new.remote_dir) / target.image
        shutil.copyfile(Path(setup.server.remote_dir) / target.image, moved)
        shutil.chown(moved, new.user, new.user)
        document = yaml.safe_load(setup.config_path.read_text())
        document["targets"][setup.name].update(port=new.port, identity_file=str(new.identity),
                                               remote_dir=Path(new.remote_dir).name)  # fmt: skip
        setup.config_path.write_text(yaml.safe_dump(document))
        refused = cryptsnap(setup, "list", setup.name, expect=7)
        assert "is not the one pinned" in refused.stderr and "--accept-new-host-key" in refused.stderr, refused.stderr
        kept = cryptsnap(setup, "init", "--accept-new-host-key", setup.name)
        assert "Pinned the host key" in kept.stdout and "kept as it is" in kept.stdout, kept.stdout
        assert records(state) == recorded, "the moved image's generation and identity are this machine's still"
        assert_nothing_left(setup)
    finally:
        sshd.stop(new)
