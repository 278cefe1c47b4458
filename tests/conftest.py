"""Shared pytest hooks: route tests/system into the QEMU guest (see tests/harness/plugin.py)."""

from __future__ import annotations

import pytest

from tests.harness import plugin


@pytest.hookimpl(trylast=True)  # after -k/-m deselection, so only selected tests go to the guest
def pytest_collection_modifyitems(config, items):
    plugin.replace_guest_items(config, items)


def pytest_configure(config):
    if plugin.IN_GUEST:  # each outcome written as it comes, and a time limit per test
        from tests.harness import progress

        config.pluginmanager.register(progress, "cryptsnap-guest-progress")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    plugin.report_timings(terminalreporter, config)
