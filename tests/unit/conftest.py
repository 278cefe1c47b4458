"""The unit tier's tmp_path: a directory whose parents nothing else changes meanwhile."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

STABLE = Path("/var/lib/cryptsnap-tests")


@pytest.fixture
def tmp_path(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A scan records the directories above a source (rsync recreates them), so a test that
    compares two scans of a tree under /tmp finds /tmp changed whenever anything else on the
    machine writes there (a guest booting beside the tier does). Under /var/lib the parents
    stay as they were; where that is not writable (not root), pytest's own."""
    if not os.access(STABLE.parent, os.W_OK):
        yield tmp_path_factory.mktemp("unit")
        return
    STABLE.mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(dir=STABLE))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
