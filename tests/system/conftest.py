"""Guest-tier fixtures. These tests run inside the QEMU guest (see tests/harness/plugin.py)."""

import pytest

from tests.support import udev
from tests.support.fixtures import setup, untrusted_host  # noqa: F401  (fixtures)
from tests.support.service import installed, service  # noqa: F401  (fixtures: cryptsnapd under systemd)


@pytest.fixture(scope="session", autouse=True)
def udev_rule():
    """The guest runs cryptsnap as installed: with its udev rule (systemd/56-cryptsnap.rules)."""
    udev.install_rule()
