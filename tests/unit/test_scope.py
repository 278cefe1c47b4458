"""The scope a block device's kernel side is moved into: its unit's name and busctl's call."""

from __future__ import annotations

from pathlib import Path

import pytest

from cryptsnap import scope


def test_the_unit_is_the_last_part_of_the_unified_cgroup_path():
    assert scope.unit_of("0::/system.slice/cryptsnapd.service\n") == "cryptsnapd.service"
    assert scope.unit_of("1:name=systemd:/x\n0::/user.slice/user-0.slice/session-3.scope\n") == "session-3.scope"
    assert scope.unit_of("0::/system.slice/cryptsnap-restore@home.service/\n") == "cryptsnap-restore@home.service"


def test_no_unit_outside_systemd_or_in_a_slice():
    assert scope.unit_of("0::/\n") is None
    assert scope.unit_of("0::/system.slice\n") is None
    assert scope.unit_of("12:pids:/docker/abc\n") is None  # cgroup v1 only: not told


def test_the_call_moves_the_pid_and_orders_the_scope_before_the_service():
    argv = scope.start_scope("cryptsnap-nbd0-42.scope", 42, "the kernel side", "cryptsnapd.service")
    assert argv[:3] == ("busctl", "call", "--quiet")
    assert argv[3:7] == (*scope.SYSTEMD, "StartTransientUnit")
    signature, name, mode, count, *props, aux = argv[7:]
    assert (signature, name, mode, aux) == ("ssa(sv)a(sa(sv))", "cryptsnap-nbd0-42.scope", "fail", "0")
    assert count == "4"
    assert props == ["PIDs", "au", "1", "42", "Description", "s", "the kernel side", "CollectMode", "s",
                     "inactive-or-failed", "Before", "as", "1", "cryptsnapd.service"]  # fmt: skip


def test_without_a_service_the_scope_has_no_order():
    argv = scope.start_scope("s.scope", 7, "d", None)
    assert argv[argv.index("fail") + 1] == "3" and "Before" not in argv


@pytest.mark.skipif(Path("/run/systemd/system").is_dir(), reason="systemd runs this machine (the guest tier tests the move)")
def test_nothing_is_moved_where_systemd_does_not_run_the_machine():
    assert scope.move_to_own_scope(1, "never.scope", "never") is None
