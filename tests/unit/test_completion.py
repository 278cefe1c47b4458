"""Bash completion, generated from the parser: run in a real bash against the real
`cryptsnap` command (targets from the configuration, snapshots from the local run record)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cryptsnap import completion

TARGET = """\
  {name}:
    host: backup.example.org
    user: backup
    identity_file: /etc/cryptsnap/id_ed25519
    size: 1G
    sources: [/etc]
    key_file: /etc/cryptsnap/{name}.key
"""
SNAPSHOTS = ["2026-11-30T020000Z", "2026-12-01T020000Z"]


@pytest.fixture
def configured(tmp_path):
    """Two configurations (the default one via $CRYPTSNAP_CONFIG, another for --config) and a run record."""
    state = tmp_path / "state"
    for file, names in (("config.yaml", ["home", "work"]), ("other.yaml", ["laptop"])):
        body = "".join(TARGET.format(name=n) for n in names)
        (tmp_path / file).write_text(f"state_dir: {state}\nruntime_dir: {tmp_path / 'run'}\ntargets:\n{body}")
    (state / "home").mkdir(parents=True)
    (state / "home" / "last-run.json").write_text(json.dumps({"result": "done", "snapshots": SNAPSHOTS}))
    (tmp_path / "completion.bash").write_text(completion.script())
    return tmp_path


def complete(where: Path, line: str) -> list[str]:
    """What bash offers for the last word of `line` (a trailing space: a new, empty word)."""
    words = shlex.split(line) + ([""] if line.endswith(" ") else [])
    program = (f"source {shlex.quote(str(where / 'completion.bash'))}\n"
               f"COMP_WORDS=({' '.join(shlex.quote(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
               "_cryptsnap; printf '%s\\n' \"${COMPREPLY[@]}\"\n")  # fmt: skip
    env = {**os.environ, "CRYPTSNAP_CONFIG": str(where / "config.yaml"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
    result = subprocess.run(["bash", "--norc", "-c", program], capture_output=True, text=True, env=env, cwd=where)
    assert result.returncode == 0, result.stderr
    return sorted(filter(None, result.stdout.split("\n")))


def test_commands_and_their_options_come_from_the_parser(configured):
    assert "backup" in complete(configured, "cryptsnap ") and "restore" in complete(configured, "cryptsnap ")
    assert complete(configured, "cryptsnap ba") == ["backup"]
    assert complete(configured, "cryptsnap check --") == ["--daemon", "--fraction", "--repair"]
    assert complete(configured, "cryptsnap -v list --r") == ["--recorded"]
    assert complete(configured, "cryptsnap --c") == ["--config"]


def test_targets_come_from_the_configuration_given_on_the_line(configured):
    assert complete(configured, "cryptsnap backup ") == ["home", "work"]
    assert complete(configured, "cryptsnap check --fraction 0.1 w") == ["work"]
    assert complete(configured, f"cryptsnap --config {configured / 'other.yaml'} list ") == ["laptop"]
    assert complete(configured, "cryptsnap backup home ") == []  # one target per command
    assert complete(configured, "cryptsnap config ") == ["check", "example", "targets"]
    assert complete(configured, "cryptsnap -c oth") == ["other.yaml"]


def test_restore_completes_target_then_snapshot_from_the_local_record(configured):
    assert complete(configured, "cryptsnap restore h") == ["home@"]
    assert complete(configured, "cryptsnap restore home@") == ["home@" + s + ":" for s in SNAPSHOTS] + ["home@latest:"]
    assert complete(configured, "cryptsnap restore home@2026-12") == [f"home@{SNAPSHOTS[1]}:"]
    assert complete(configured, "cryptsnap restore work@") == ["work@latest:"]  # no run recorded yet
