"""What monitoring reads: `cryptsnap status --json` and the node_exporter textfile.

One document per target with the same fields whether it comes from cryptsnapd's D-Bus
properties or from this machine's run records (docs/monitoring.md lists them; they only
grow: a field is never renamed or removed without a new "format" number).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

FORMAT = 1


def _seconds(usec: int) -> float | None:
    return usec / 1_000_000 if usec else None


def from_properties(props: dict) -> dict:
    """A target's document from its org.cryptsnap1.Target properties (cryptsnapd is running)."""
    return {
        "name": props["Name"],
        "state": props["State"],
        "last_result": props["LastResult"] or None,
        "last_attempt": _seconds(props["LastAttempt"]),
        "last_success": _seconds(props["LastSuccess"]),
        "last_error": props["LastError"] or None,
        "last_exit_code": props["LastExitCode"] if props["LastResult"] else None,
        "bytes_up": props["BytesUploaded"],
        "bytes_down": props["BytesDownloaded"],
        "snapshots": list(props["Snapshots"]),
        "next_run": _seconds(props["NextElapse"]),
        "image_size": props["ImageSize"] or None,
        "image_free": props["ImageFree"] if props["ImageSize"] else None,
        "deferred": props.get("Deferred") or None,
        "last_check": props.get("LastCheck") or None,
        "last_check_time": _seconds(props.get("LastCheckTime", 0)),
        "last_check_error": props.get("LastCheckError") or None,
    }


def from_record(name: str, run: dict, running: bool | None, checked: dict | None = None) -> dict:
    """A target's document from its last-run.json and last-check.json (state_dir); `running`:
    None when unknown."""
    checked = checked or {}
    return {
        "name": name,
        "state": None if running is None else "running" if running else "idle",
        "last_result": run.get("result") or None,
        "last_attempt": run.get("finished") or None,
        "last_success": run.get("last_success") or None,
        "last_error": run.get("error") or None,
        "last_exit_code": run.get("exit_code") if run.get("result") else None,
        "bytes_up": int(run.get("bytes_up", 0)),
        "bytes_down": int(run.get("bytes_down", 0)),
        "snapshots": list(run.get("snapshots", [])),
        "next_run": None,
        "image_size": run.get("image_size") or None,
        "image_free": run.get("image_free") if run.get("image_size") else None,
        "deferred": None,
        "last_check": checked.get("result") or None,
        "last_check_time": checked.get("finished") or None,
        "last_check_error": checked.get("error") or None,
    }


def document(targets: list[dict], source: str) -> dict:
    """The whole of `cryptsnap status --json`; source: "cryptsnapd" or "local records"."""
    return {"format": FORMAT, "source": source, "targets": {t["name"]: t for t in targets}}


METRICS = (  # name, help, type, value from a target's record
    ("cryptsnap_last_run_timestamp_seconds", "End of the last run, successful or not.", "gauge",
     lambda run: run.get("finished", 0)),
    ("cryptsnap_last_success_timestamp_seconds", "End of the last successful run (0: never).", "gauge",
     lambda run: run.get("last_success", 0)),
    ("cryptsnap_last_run_success", "1 if the last run succeeded (made its snapshot, or found nothing changed: "
     "skip_unchanged), else 0.", "gauge",
     lambda run: 1 if run.get("result") == "done" else 0),
    ("cryptsnap_last_run_exit_code", "The last run's exit code (cryptsnap --help lists them).", "gauge",
     lambda run: run.get("exit_code", 0)),
    ("cryptsnap_last_run_duration_seconds", "How long the last run took.", "gauge",
     lambda run: max(0.0, run.get("finished", 0) - run.get("started", 0)) if run.get("started") else 0),
    ("cryptsnap_last_run_uploaded_bytes", "Bytes sent on the ssh connection during the last run.", "gauge",
     lambda run: run.get("bytes_up", 0)),
    ("cryptsnap_last_run_downloaded_bytes", "Bytes received on the ssh connection during the last run.", "gauge",
     lambda run: run.get("bytes_down", 0)),
    ("cryptsnap_snapshots", "Complete snapshots in the image, as of the last run.", "gauge",
     lambda run: len(run.get("snapshots", []))),
    ("cryptsnap_image_size_bytes", "Size of the file system inside the image (0: not measured yet).", "gauge",
     lambda run: run.get("image_size", 0)),
    ("cryptsnap_last_check_ok", "1 if the last `cryptsnap check` found the image sound, else 0.", "gauge",
     lambda run: 1 if run.get("check", {}).get("result") == "ok" else 0),
    ("cryptsnap_last_check_timestamp_seconds", "End of the last check (0: never).", "gauge",
     lambda run: run.get("check", {}).get("finished", 0)),
    ("cryptsnap_image_free_bytes", "Free bytes in the image's file system, as the last backup measured them.",
     "gauge", lambda run: run.get("image_free", 0)),
)  # fmt: skip


def prometheus(runs: dict[str, dict]) -> str:
    """The Prometheus text exposition of every target's last run (target -> last-run record)."""
    lines = []
    for name, help_text, kind, value in METRICS:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for target, run in sorted(runs.items()):
            number = float(value(run))
            lines.append(f'{name}{{target="{target}"}} {int(number) if number.is_integer() else round(number, 3)}')
    return "\n".join(lines) + "\n"


def write_metrics(path: Path, runs: dict[str, dict]) -> bool:
    """Replace `path` atomically (node_exporter may read at any time); False when its directory
    does not exist (no node_exporter here: nothing to do)."""
    if not path.parent.is_dir():
        return False
    fd, tmp = tempfile.mkstemp(prefix=".cryptsnap-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(prometheus(runs))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return True


def update_metrics(config) -> None:
    """Rewrite the configured metrics file from every target's last run (cryptsnapd after each
    job and at its start; `cryptsnap backup` run without it). A failure is logged, never fatal."""
    if not config.metrics_file:
        return
    from .state import TargetState

    states = {name: TargetState(target) for name, target in config.targets.items()}
    runs = {name: {**state.last_run(), "check": state.last_check()} for name, state in states.items()}
    try:
        if write_metrics(Path(config.metrics_file), runs):
            log.debug("metrics written to %s", config.metrics_file)
    except OSError as exc:
        log.warning("cannot write the metrics file %s: %s", config.metrics_file, exc)
