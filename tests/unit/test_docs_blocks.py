"""The docs' runnable blocks: found, valid shell, and each run by the test its marker names."""

from __future__ import annotations

import subprocess

import pytest

from tests.support import docs

MARKED = [(page, name, text) for page in sorted(docs.DOCS.glob("*.md")) for name, text in docs.blocks(page).items()]


def test_the_restore_page_has_its_block():
    assert "restore-by-hand" in docs.blocks(docs.DOCS / "restore-by-hand.md")


@pytest.mark.parametrize(("page", "name", "text"), MARKED, ids=[f"{p.name}:{n}" for p, n, _ in MARKED])
def test_each_marked_block_is_valid_shell_and_run_by_a_test(page, name, text):
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    tests = docs.DOCS.parent / "tests" / "system"
    assert any(f'"{name}"' in path.read_text() for path in tests.glob("test_*.py")), f"no guest test runs {name}"


def test_values_replace_each_assignment_once_and_quote():
    text = "A=1 B=/x/y\necho $A=2 $B\n"
    assert docs.with_values(text, {"A": "it's", "B": "/z"}) == "A='it'\"'\"'s' B=/z\necho $A=2 $B\n"
    with pytest.raises(AssertionError, match="C= 0 times"):
        docs.with_values(text, {"C": "1"})
