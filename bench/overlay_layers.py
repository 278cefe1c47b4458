"""History as overlay layers, for bench.scatter_lab --fs overlay, through cryptsnap's layer
store (cryptsnap.overlay): the tree in LAYERS/0, each run's change in LAYERS/N, the state
after run N named "run-N" (the oldest "run-0"). Dropping a state merges the layer above it
into its own by renames: no file's data moves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from cryptsnap import overlay


def begin(layers: Path) -> None:
    """LAYERS/0, which the caller fills with the first state."""
    (layers / "0").mkdir(parents=True)
    overlay.write_names(layers, [(0, "run-0")])


@contextlib.contextmanager
def writable(layers: Path, work: Path, merged: Path, n: int) -> Iterator[Path]:
    """Run N's layer, over every layer there is; named once written."""
    with overlay.writable(layers, n, work, merged) as root:
        yield root
    overlay.write_names(layers, [*overlay.read_names(layers), (n, f"run-{n}")])


def read_only(layers: Path, n: int, where: Path) -> contextlib.AbstractContextManager[Path]:
    """The state after run N."""
    return overlay.view(layers, f"run-{n}", where)


def kept(layers: Path) -> list[int]:
    """The runs whose states are kept, oldest first."""
    return [int(name.removeprefix("run-")) for _, name in overlay.read_names(layers)]


def drop(layers: Path, n: int) -> None:
    overlay.drop(layers, f"run-{n}")
