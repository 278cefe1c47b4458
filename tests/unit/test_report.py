"""cryptsnap.report: the status document has the same fields from cryptsnapd and from the local
records, and the Prometheus textfile is well formed and replaced whole."""

from __future__ import annotations

import re

from cryptsnap import report

RUN = {"result": "failed", "started": 1_700_000_000.0, "finished": 1_700_000_042.5, "last_success": 1_699_990_000.0,
       "error": "unlocking: wrong key", "exit_code": 6, "bytes_up": 1234, "bytes_down": 56,
       "snapshots": ["2026-12-01T000000Z", "2026-12-02T000000Z"], "image_size": 10 << 30,
       "image_free": 3 << 30}  # fmt: skip
PROPS = {"Name": "home", "State": "idle", "LastResult": "failed", "LastAttempt": 1_700_000_042_500_000,
         "LastSuccess": 1_699_990_000_000_000, "LastError": "unlocking: wrong key", "LastExitCode": 6,
         "BytesUploaded": 1234, "BytesDownloaded": 56, "Snapshots": RUN["snapshots"], "NextElapse": 0,
         "Job": "/", "ImageSize": 10 << 30, "ImageFree": 3 << 30, "Deferred": "", "LastCheck": "ok",
         "LastCheckTime": 1_700_000_100_000_000, "LastCheckError": ""}  # fmt: skip


def test_both_sources_give_the_same_document():
    local = report.from_record("home", RUN, running=False, checked={"result": "ok", "finished": 1_700_000_100.0})
    remote = report.from_properties(PROPS)
    assert local == remote
    assert local["last_attempt"] == 1_700_000_042.5 and local["last_exit_code"] == 6 and local["next_run"] is None
    never = report.from_record("new", {}, running=None)
    assert never["last_result"] is None and never["last_exit_code"] is None and never["state"] is None
    assert never["image_size"] is None and never["image_free"] is None
    assert report.document([local], "cryptsnapd") == {"format": 1, "source": "cryptsnapd", "targets": {"home": local}}


def test_the_prometheus_text_has_help_type_and_one_sample_per_target():
    text = report.prometheus({"home": RUN, "etc": {"result": "done", "finished": 5.0, "last_success": 5.0}})
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    assert all(re.fullmatch(r'cryptsnap_[a-z_]+\{target="(etc|home)"\} -?[0-9.]+', line) for line in samples), text
    assert len(samples) == 2 * len(report.METRICS)
    assert 'cryptsnap_last_run_success{target="home"} 0' in samples
    assert 'cryptsnap_last_run_success{target="etc"} 1' in samples
    assert 'cryptsnap_last_run_timestamp_seconds{target="home"} 1700000042.5' in samples
    assert 'cryptsnap_last_run_duration_seconds{target="home"} 42.5' in samples
    assert 'cryptsnap_snapshots{target="home"} 2' in samples
    assert 'cryptsnap_image_free_bytes{target="home"} 3221225472' in samples
    assert text.count("# TYPE") == len(report.METRICS)


def test_the_metrics_file_is_written_only_where_its_directory_exists(tmp_path):
    assert not report.write_metrics(tmp_path / "absent" / "cryptsnap.prom", {"home": RUN})
    assert not (tmp_path / "absent").exists()
    path = tmp_path / "cryptsnap.prom"
    assert report.write_metrics(path, {"home": RUN})
    assert path.read_text() == report.prometheus({"home": RUN})
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert [p.name for p in tmp_path.iterdir()] == ["cryptsnap.prom"], "no temporary file left"


def test_low_on_space_is_under_the_percentage_and_never_before_a_measure():
    import dataclasses

    from cryptsnap import config
    from cryptsnap.pipeline import low_on_space
    from tests.unit.test_config import GOOD

    target = dataclasses.replace(config.parse(GOOD, "c.yaml").target("home"), free_space_warning=10)
    assert low_on_space(target, 1000, 99) and not low_on_space(target, 1000, 100)
    assert not low_on_space(target, 0, 0), "no measure yet is not low"
