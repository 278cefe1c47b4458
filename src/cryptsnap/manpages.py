"""Man pages generated from what they describe, so they cannot drift from it: cryptsnap(1)
from the command-line parser, cryptsnap.yaml(5) from the configuration schema, cryptsnapd(8)
from the daemon's parser and the D-Bus contract (org.cryptsnap1.xml).

    python3 -m cryptsnap.manpages OUTDIR          # writes cryptsnap.1, cryptsnap.yaml.5, cryptsnapd.8
    python3 -m cryptsnap.manpages --tree /usr/share/man   # into man1/, man5/, man8/
"""

from __future__ import annotations

import argparse
import re
import sys
import xml.etree.ElementTree as ET
from importlib import resources
from pathlib import Path

from . import __version__, cli, config, schema
from .errors import EXIT_CODES
from .schema import Option

SEE_ALSO = {"cryptsnap": "1", "cryptsnap.yaml": "5", "cryptsnapd": "8"}


def esc(text: str) -> str:
    """Text as roff reads it literally: backslashes and hyphens escaped, no line taken for a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line for line in text.split("\n"))


def _inline(text: str) -> str:
    """Escaped text with `code` spans in bold."""
    return re.sub(r"`([^`]+)`", lambda m: f"\\fB{m.group(1)}\\fR", esc(text))


def _head(name: str, section: str, title: str, summary: str) -> list[str]:
    return [f'.TH {esc(name.upper())} {section} "" "cryptsnap {__version__}" "{title}"', ".SH NAME",
            f"{esc(name)} \\- {esc(summary)}"]  # fmt: skip


def _see_also(name: str) -> list[str]:
    others = [f".BR {page} ({section})" for page, section in SEE_ALSO.items() if page != name]
    return [".SH SEE ALSO", *[line + "," for line in others[:-1]], others[-1],
            "and the documentation in /usr/share/doc/cryptsnap."]  # fmt: skip


def _options(parser: argparse.ArgumentParser) -> list[str]:
    """One .TP entry per option and positional argument of a parser (not --help)."""
    formatter = parser._get_formatter()
    lines = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction | argparse._VersionAction):
            continue
        if action.option_strings:
            takes = f" {action.metavar or action.dest.upper()}" if action.nargs != 0 else ""
            shown = ", ".join(f"\\fB{esc(o)}\\fR{esc(takes) if takes else ''}" for o in action.option_strings)
        else:
            shown = f"\\fI{esc(action.metavar or action.dest)}\\fR"
        lines += [".TP", shown, _inline(formatter._expand_help(action)) if action.help else ""]
    return lines


def cryptsnap_1() -> str:
    parser = cli.build_parser()
    out = _head("cryptsnap", "1", "cryptsnap manual",
                "encrypted, incremental snapshot backups to a host you do not trust")  # fmt: skip
    out += [".SH SYNOPSIS", ".B cryptsnap", "[\\fB\\-\\-config\\fR \\fIPATH\\fR] [\\fB\\-v\\fR] \\fICOMMAND\\fR "
            "[\\fIARGUMENTS\\fR]", ".SH DESCRIPTION", _inline(parser.description), ".SH OPTIONS", *_options(parser),
            ".TP", "\\fB\\-\\-version\\fR", "Print the version and exit.", ".SH COMMANDS"]  # fmt: skip
    for name, sub in cli.subcommands(parser).items():
        usage = " ".join(sub.format_usage().split())[len("usage: ") :].replace(" [-h]", "")
        out += [f'.SS "{esc(name)}"', f".B {esc(usage)}", ".PP", _inline(sub.description or ""), *_options(sub)]
    out += [".SH EXIT STATUS", *[f".TP\n.B {code}\n{_inline(text)}" for code, text in sorted(EXIT_CODES.items())]]
    out += [".SH ENVIRONMENT", ".TP", ".B CRYPTSNAP_CONFIG",
            f"The configuration file when \\fB\\-\\-config\\fR is not given (default {esc(config.DEFAULT_PATH)}).",
            ".SH FILES", ".TP", f".I {esc(config.DEFAULT_PATH)}", "The configuration; see "
            ".BR cryptsnap.yaml (5).", ".TP", ".I /var/lib/cryptsnap/TARGET/",
            "This machine's state of a target: pinned host key, LUKS header backup, run records, metadata cache "
            "(state_dir).", ".TP", ".I /run/cryptsnap/", "Mount points and locks of running jobs (runtime_dir).",
            *_see_also("cryptsnap")]  # fmt: skip
    return "\n".join(out) + "\n"


def _describe(option: Option) -> str:
    text = option.description
    if option.type == "choice":
        text += f" One of: {', '.join(option.choices)}."
    if option.required:
        text += " Required."
    elif option.default not in (None, [], {}) and option.type not in ("section", "named"):
        text += f" Default: {_value(option.default)}."
    return text


def _value(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _schema_section(options: dict[str, Option], prefix: str, out: list[str]) -> None:
    nested = []
    for key, option in options.items():
        kind = {"named": "mapping of names", "section": "mapping"}.get(option.type, option.type)
        out += [".TP", f"\\fB{esc(key)}\\fR ({esc(kind)})", _inline(_describe(option))]
        if option.children:
            nested.append((f"{prefix}{key}.NAME." if option.type == "named" else f"{prefix}{key}.", option.children))
    for heading, children in nested:
        out.append(f'.SS "{esc(heading.rstrip("."))}"')
        _schema_section(children, heading, out)


def cryptsnap_yaml_5() -> str:
    out = _head("cryptsnap.yaml", "5", "cryptsnap manual", "configuration of cryptsnap and cryptsnapd")
    out += [".SH DESCRIPTION", f"A YAML file, by default \\fI{esc(config.DEFAULT_PATH)}\\fR (or "
            "\\fB$CRYPTSNAP_CONFIG\\fR, or \\fBcryptsnap \\-\\-config\\fR). Every error is reported at once with "
            "its file, line and key; \\fBcryptsnap config check\\fR validates a file without running anything, and "
            "\\fBcryptsnap config example\\fR prints the commented example below. cryptsnapd reads the file again "
            "on SIGHUP (\\fBsystemctl reload cryptsnapd\\fR).", ".SH OPTIONS", '.SS "Top level"']  # fmt: skip
    _schema_section(schema.TOP, "", out)
    out += [".SH EXAMPLE", ".nf", esc(config.example().rstrip("\n")), ".fi", *_see_also("cryptsnap.yaml")]
    return "\n".join(out) + "\n"


def dbus_contract() -> list[tuple[str, list[tuple[str, str, str]]]]:
    """(interface, [(kind, signature line, description)]) from the XML, with the comment
    before each member as its description (a comment may name several: "A, B: ...")."""
    text = resources.files("cryptsnap").joinpath("org.cryptsnap1.xml").read_text()
    root = ET.fromstring(text, ET.XMLParser(target=ET.TreeBuilder(insert_comments=True)))
    contract = []
    for interface in root.iter("interface"):
        members, comment = [], ""
        for child in interface:
            if child.tag is ET.Comment:
                comment = " ".join(child.text.split())
                continue
            name = child.get("name")
            named = re.match(r"^([A-Za-z, ]+): ", comment)
            applies = not named or name in [n.strip() for n in named.group(1).split(",")]
            described = (comment[named.end() :] if named else comment) if applies else ""
            if child.tag == "property":
                line = f"{name} ({child.get('type')}, {child.get('access')})"
            else:
                args = [f"{a.get('direction', 'out') if child.tag == 'method' else ''} {a.get('type')} "
                        f"{a.get('name')}".strip() for a in child.iter("arg")]  # fmt: skip
                line = f"{name}({', '.join(args)})"
            members.append((child.tag, line, described))
            if not named or name == [n.strip() for n in named.group(1).split(",")][-1]:
                comment = ""
        contract.append((interface.get("name"), members))
    return contract


def cryptsnapd_8() -> str:
    from .daemon import build_parser  # needs GLib: only this page

    parser = build_parser()
    out = _head("cryptsnapd", "8", "cryptsnap manual", "the cryptsnap backup service")
    out += [".SH SYNOPSIS", ".B cryptsnapd", "[\\fB\\-\\-config\\fR \\fIPATH\\fR] [\\fB\\-v\\fR]", ".SH DESCRIPTION",
            _inline(parser.description),
            "It runs one job per target at a time under the target's lock, each in a worker process, and "
            "unwinds what a killed run left open when it starts. SIGHUP reloads the configuration without "
            "touching running jobs (so does a request for an unknown target once the file changed); "
            "SIGTERM cancels and unwinds every job, then exits. Units: "
            "\\fBcryptsnapd.service\\fR (bus-activated), \\fBcryptsnap\\-backup@TARGET.timer\\fR (a schedule per "
            "target), \\fBcryptsnap\\-restore@TARGET.service\\fR (all snapshots read-only under "
            "/run/cryptsnap/restore/TARGET).",
            ".SH OPTIONS", *_options(parser), ".SH D\\-BUS INTERFACE",
            "Bus name \\fBorg.cryptsnap1\\fR on the system bus; read it with \\fBbusctl\\fR, e.g. "
            "\\fBbusctl introspect org.cryptsnap1 /org/cryptsnap1\\fR. Reading properties is open to every local "
            "user; StartBackup and Cancel need root or the group \\fBcryptsnap\\fR. Errors: "
            "org.cryptsnap1.Error.Busy, .NoSuchTarget, .AccessDenied, .Failed."]  # fmt: skip
    for interface, members in dbus_contract():
        out.append(f'.SS "{esc(interface)}"')
        for kind, line, described in members:
            out += [".TP", f"{esc(kind)} \\fB{esc(line)}\\fR", _inline(described) if described else ""]
    out += _see_also("cryptsnapd")
    return "\n".join(out) + "\n"


PAGES = {"cryptsnap.1": cryptsnap_1, "cryptsnap.yaml.5": cryptsnap_yaml_5, "cryptsnapd.8": cryptsnapd_8}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m cryptsnap.manpages", description=__doc__.split("\n\n")[0])
    parser.add_argument("outdir", type=Path, help="where to write the pages (created if missing)")
    parser.add_argument("--tree", action="store_true",
                        help="write each page into its section's directory, as under /usr/share/man (man1/...)")
    args = parser.parse_args(argv)
    for name, make in PAGES.items():
        where = args.outdir / f"man{name.rsplit('.', 1)[1]}" if args.tree else args.outdir
        where.mkdir(parents=True, exist_ok=True)
        (where / name).write_text(make())
        print(where / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
