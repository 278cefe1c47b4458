"""Guest-tier fixtures. These tests run inside the QEMU guest (see tests/harness/plugin.py)."""

from tests.support.fixtures import setup, untrusted_host  # noqa: F401  (fixtures)
