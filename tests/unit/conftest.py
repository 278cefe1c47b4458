"""The unit tier's tmp_path: a directory whose parents nothing else changes meanwhile."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

STABLE = Path("/var/lib/cryptsnap-tests")


@pytest.fixture(scope="session")
def stable_base() -> Iterator[Path | None]:
    """This session's directory under STABLE (another session's, made beside it, changes
    only STABLE, once); None where /var/lib is not writable (not root)."""
    if not os.access(STABLE.parent, os.W_OK):
        yield None
        return
    STABLE.mkdir(exist_ok=True)
    base = Path(tempfile.mkdtemp(dir=STABLE, prefix="session-"))
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)
        with contextlib.suppress(OSError):  # nothing left behind by the last session
            STABLE.rmdir()


@pytest.fixture
def tmp_path(stable_base: Path | None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A scan records the directories above a source (rsync recreates them), so a test that
    compares two scans of a tree under /tmp finds /tmp changed whenever anything else on the
    machine writes there (a guest booting beside the tier does). Under /var/lib the parents
    stay as they were; where that is not writable, pytest's own."""
    if stable_base is None:
        yield tmp_path_factory.mktemp("unit")
        return
    path = Path(tempfile.mkdtemp(dir=stable_base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
