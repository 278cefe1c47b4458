"""Shell blocks of the docs that tests run as written: the indented block after a line
`<!-- test: NAME ... -->`, with the values of its "fill in" variables replaced by the test's."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

DOCS = Path(__file__).resolve().parents[2] / "docs"
MARKER = re.compile(r"^<!-- test: (\S+)")


def blocks(page: Path) -> dict[str, str]:
    """NAME -> the block's text (dedented), for every marked block of `page`."""
    found: dict[str, str] = {}
    lines = page.read_text().splitlines()
    for i, line in enumerate(lines):
        marker = MARKER.match(line)
        if not marker:
            continue
        body: list[str] = []
        for following in lines[i + 1 :]:
            if following.startswith("    ") or (not following.strip() and (body or not following)):
                body.append(following[4:])
            elif following.strip():
                break
        found[marker[1]] = "\n".join(body).strip("\n") + "\n"
    return found


def block(page: str, name: str) -> str:
    found = blocks(DOCS / page)
    if name not in found:
        raise AssertionError(f"docs/{page} has no block marked <!-- test: {name} -->")
    return found[name]


def with_values(text: str, values: dict[str, str]) -> str:
    """`text` with each NAME=... assignment of `values` set to the test's value; each must be
    assigned exactly once, so the page and the test cannot drift apart unnoticed."""
    for name, value in values.items():
        assignment = f"{name}={shlex.quote(value)}"
        text, count = re.subn(rf"(?<![\w$]){name}=\S+", lambda _m, new=assignment: new, text)
        if count != 1:
            raise AssertionError(f"the block assigns {name}= {count} times, not once")
    return text
