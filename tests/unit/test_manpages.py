"""The man pages are generated from the parser, the schema and the D-Bus contract: each of
those has every entry in its page, and every page renders without a warning."""

from __future__ import annotations

import os
import subprocess

import pytest

from cryptsnap import cli, manpages, schema
from cryptsnap.daemon import build_parser as daemon_parser
from cryptsnap.errors import EXIT_CODES
from cryptsnap.manpages import esc


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    out = tmp_path_factory.mktemp("man")
    assert manpages.main([str(out)]) == 0
    return {name: (out / name).read_text() for name in manpages.PAGES}


def options_of(parser):
    return [o for action in parser._actions for o in action.option_strings if o not in ("-h", "--help")]


def test_every_command_option_and_exit_code_is_in_cryptsnap_1(pages):
    page = pages["cryptsnap.1"]
    parser = cli.build_parser()
    commands = cli.subcommands(parser)
    assert {"init", "backup", "list", "restore", "check", "status", "config"} <= set(commands)
    for name, sub in commands.items():
        assert f'.SS "{esc(name)}"' in page, f"command {name} is not in cryptsnap(1)"
        for option in options_of(sub):
            section = page.split(f'.SS "{esc(name)}"', 1)[1].split(".SS ", 1)[0]
            assert f"\\fB{esc(option)}\\fR" in section, f"{name} {option} is not in its section of cryptsnap(1)"
    for option in options_of(parser):
        assert f"\\fB{esc(option)}\\fR" in page
    for code in EXIT_CODES:
        assert f".TP\n.B {code}\n" in page, f"exit code {code} is not in cryptsnap(1)"


def all_options(options):
    for key, option in options.items():
        yield key, option
        yield from all_options(option.children)


def test_every_configuration_option_is_in_cryptsnap_yaml_5(pages):
    page = pages["cryptsnap.yaml.5"]
    for key, option in all_options(schema.TOP):
        assert f"\\fB{esc(key)}\\fR (" in page, f"option {key} is not in cryptsnap.yaml(5)"
        assert manpages._inline(manpages._describe(option)) in page, f"{key}'s description is not in cryptsnap.yaml(5)"
    assert '.SS "targets.NAME.retention"' in page


def test_every_dbus_member_and_daemon_option_is_in_cryptsnapd_8(pages):
    page = pages["cryptsnapd.8"]
    contract = manpages.dbus_contract()
    assert [name for name, _ in contract] == ["org.cryptsnap1.Manager", "org.cryptsnap1.Target", "org.cryptsnap1.Job"]
    members = [line.split("(")[0].strip() for _, ms in contract for _, line, _ in ms]
    assert {"StartBackup", "Cancel", "ListTargets", "JobRemoved", "LastError", "Phase"} <= set(members)
    for _, ms in contract:
        for kind, line, described in ms:
            assert f"{kind} \\fB{esc(line)}\\fR" in page
            assert described, f"{line} has no description in org.cryptsnap1.xml"
    for option in options_of(daemon_parser()):
        assert f"\\fB{esc(option)}\\fR" in page


def test_a_comment_naming_two_members_describes_both():
    target = dict(manpages.dbus_contract())["org.cryptsnap1.Target"]
    described = {line.split(" ")[0]: text for _, line, text in target}
    assert described["LastSuccess"] == described["LastAttempt"] != ""
    assert described["LastError"].startswith("the last failed run's message")


def test_the_pages_render_without_warnings(pages, tmp_path):
    for name, text in pages.items():
        (tmp_path / name).write_text(text)
        result = subprocess.run(["man", "--warnings", "-E", "UTF-8", "-l", str(tmp_path / name)],
                                capture_output=True, text=True, env={**os.environ, "MANWIDTH": "80"})  # fmt: skip
        assert result.returncode == 0 and not result.stderr.strip(), f"{name}: {result.stderr}"
        assert name.split(".")[0].upper() in result.stdout
