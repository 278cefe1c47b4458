"""What monitoring reads after a run without cryptsnapd: the node_exporter textfile and
`cryptsnap status --json` (the guest tier checks both through cryptsnapd and its sandbox)."""

from __future__ import annotations

import json

import yaml

from tests.host.test_layers import prepare
from tests.support.checks import assert_nothing_left, cryptsnap


def test_a_failed_local_run_shows_in_the_metrics_file_and_in_status_json(setup, tmp_path):
    prepare(setup)  # this machine has no device-mapper: the run will fail at unlocking, and be recorded
    metrics = tmp_path / "node-exporter" / "cryptsnap.prom"
    document = yaml.safe_load(setup.config_path.read_text())
    document["metrics_file"] = str(metrics)
    setup.config_path.write_text(yaml.safe_dump(document))
    cryptsnap(setup, "backup", setup.name, expect=None)
    assert not metrics.exists() and not metrics.parent.exists(), "written without node_exporter's directory"

    metrics.parent.mkdir()
    failed = cryptsnap(setup, "backup", setup.name, expect=None)
    assert failed.returncode not in (0, 1), failed.stderr
    text = metrics.read_text()
    assert f'cryptsnap_last_run_success{{target="{setup.name}"}} 0' in text, text
    assert f'cryptsnap_last_run_exit_code{{target="{setup.name}"}} {failed.returncode}' in text, text

    status = json.loads(cryptsnap(setup, "status", "--json").stdout)
    assert status["format"] == 1 and status["source"] == "local records"
    mine = status["targets"][setup.name]
    assert mine["last_result"] == "failed" and mine["last_exit_code"] == failed.returncode, mine
    assert mine["last_error"].startswith("unlocking:") and mine["state"] == "idle", mine
    assert set(mine) == {"name", "state", "last_result", "last_attempt", "last_success", "last_error",
                         "last_exit_code", "bytes_up", "bytes_down", "snapshots", "next_run", "image_size",
                         "image_free", "deferred", "last_check", "last_check_time", "last_check_error"}  # fmt: skip
    assert_nothing_left(setup)
