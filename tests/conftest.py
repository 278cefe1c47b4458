"""Shared pytest hooks: route tests/system into the QEMU guest (see tests/harness/plugin.py)."""

from __future__ import annotations

import os

import pytest

from tests.harness import plugin


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", help="also run the tests marked long (make test-long)")


@pytest.hookimpl(trylast=True)  # after -k/-m deselection, so only selected tests go to the guest
def pytest_collection_modifyitems(config, items):
    if config.getoption("--long"):
        os.environ[plugin.LONG_ENV] = "1"
    if not plugin.long_run():  # tests marked `long` run only with --long
        left_out = [item for item in items if item.get_closest_marker("long") is not None]
        if left_out:
            config.hook.pytest_deselected(items=left_out)
            items[:] = [item for item in items if item.get_closest_marker("long") is None]
    plugin.replace_guest_items(config, items)


def pytest_configure(config):
    if plugin.IN_GUEST:  # each outcome written as it comes, and a time limit per test
        from tests.harness import progress

        config.pluginmanager.register(progress, "cryptsnap-guest-progress")


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    plugin.report_timings(terminalreporter, config)
