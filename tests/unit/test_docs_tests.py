"""Every test the docs name exists: a page that says "checked by test_x" must not outlive test_x."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NAMED = re.compile(r"\b(test_[a-z0-9_]+)(…|\.\.\.)?")


def test_every_test_the_docs_name_exists():
    tests = list((ROOT / "tests").rglob("*.py"))
    defined = {m.group(1) for path in tests for m in re.finditer(r"def (test_[a-z0-9_]+)\(", path.read_text())}
    defined |= {path.stem for path in tests}  # a module named as a whole
    missing = []
    for page in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        for match in NAMED.finditer(page.read_text()):
            name, shortened = match.groups()
            found = any(d.startswith(name) for d in defined) if shortened else name in defined
            if not found:
                missing.append(f"{page.name}: {name}{shortened or ''}")
    assert not missing, f"the docs name tests that do not exist: {missing}"
