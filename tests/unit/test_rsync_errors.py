"""rsync's exit 23 said in words where its errors have one cause (snapshot.explain_rsync_errors).
The errors are the real rsync's, run as nobody over a directory it may not read."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from cryptsnap import snapshot

VANISHED_XATTRS = """\
rsync: [sender] get_xattr_names: llistxattr("/src/busy/f17",1024) failed: No such file or directory (2)
rsync error: some files/attrs were not transferred (see previous errors) (code 23) at main.c(1338) [sender=3.2.7]
"""


def test_a_directory_rsync_may_not_read_is_named_with_what_to_do():
    base = Path(tempfile.mkdtemp(prefix="cryptsnap-rsync-"))  # not tmp_path: private to root
    try:
        os.chmod(base, 0o755)
        source, copy = base / "src", base / "copy"
        (source / "private").mkdir(parents=True)
        (source / "private" / "f").write_text("x")
        (source / "open").write_text("y")
        os.chmod(source / "private", 0o700)  # root's: as nobody, rsync is refused it
        copy.mkdir()
        os.chown(copy, pwd.getpwnam("nobody").pw_uid, -1)  # rsync sets its attributes
        done = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                               "rsync", "-a", f"{source}/", f"{copy}/"], capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 23, done.stderr
        said = snapshot.explain_rsync_errors(done.returncode, done.stderr)
        assert said is not None, done.stderr
        assert said.startswith(f"rsync, as root, was refused {source}/private (Permission denied)"), said
        assert "NFS with root_squash" in said and "the target's excludes" in said, said
    finally:
        shutil.rmtree(base)


def test_files_deleted_while_rsync_read_their_attributes_are_named_as_such():
    said = snapshot.explain_rsync_errors(23, VANISHED_XATTRS)
    assert said is not None and said.startswith("1 file(s) were deleted on this machine while rsync read"), said
    assert 'llistxattr("/src/busy/f17",1024) failed' in said and "the next run goes on" in said, said


def test_other_failures_keep_rsync_s_own_words():
    mixed = VANISHED_XATTRS + 'rsync: [sender] opendir "/src/x" failed: Permission denied (13)\n'
    assert snapshot.explain_rsync_errors(23, mixed) is None  # two causes: rsync's lines say more
    assert snapshot.explain_rsync_errors(11, "rsync: write failed on \"/x\": No space left on device (28)\n") is None
    assert snapshot.explain_rsync_errors(23, "rsync error: some files/attrs were not transferred\n") is None
    # The image's side gone (a cut connection takes the mount): not the machine's files.
    receiver = 'rsync: [receiver] mkstemp "/mnt/s/etc/.fstab.Xq1" failed: No such file or directory (2)\n'
    assert snapshot.explain_rsync_errors(23, receiver) is None
    assert snapshot.explain_rsync_errors(23, VANISHED_XATTRS + receiver) is None


# As rsync 3.2.7 says them writing into a layered image's overlay (history: layers): a whiteout
# (Linux 6.18 and 6.1) and overlayfs's own attribute (Debian 12's 6.1; later kernels escape it).
OVERLAY_MARKERS = """\
rsync: [generator] mknod "/run/cryptsnap/home/fs/.cryptsnap/overlay/var/lib/containers/storage/wh" failed: \
Operation not permitted (1)
rsync: [receiver] rsync_xal_set: lsetxattr("/run/cryptsnap/home/fs/.cryptsnap/overlay/var/lib/containers/d",\
"trusted.overlay.opaque") failed: Operation not permitted (1)
rsync error: some files/attrs were not transferred (see previous errors) (code 23) at main.c(1338) [generator=3.2.7]
"""


def test_overlayfs_markers_in_the_sources_are_named_with_what_to_do():
    said = snapshot.explain_rsync_errors(23, OVERLAY_MARKERS)
    assert said.startswith("overlayfs cannot keep /var/lib/containers/d, /var/lib/containers/storage/wh in a layer")
    assert "excludes" in said and "snapshots before it are as they were" in said
    # The same refusal outside a layered run's overlay is not this.
    assert snapshot.explain_rsync_errors(23, OVERLAY_MARKERS.replace("/.cryptsnap/overlay", "")) is None
