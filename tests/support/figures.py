"""Figures a test measured (how long a fault took to be reported), for docs/reliability.md.

Appended as JSON lines to /results/figures.jsonl in the guest (build/vm-results/ on the
host after the run), and printed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

RESULTS = Path(os.environ.get("CRYPTSNAP_FIGURES_DIR", "/results"))


def record(scenario: str, **values) -> None:
    line = json.dumps({"scenario": scenario, **values})
    print(line)
    if RESULTS.is_dir() and os.access(RESULTS, os.W_OK):
        with open(RESULTS / "figures.jsonl", "a") as out:
            out.write(line + "\n")
