"""A real tree and a real change: successive releases of a large project's source tree, each
run's source replaced by the next release as unpacking it over the old one leaves it (every
file gets the archive's mtime, also where its bytes did not change, as in a package upgrade;
changed, added and removed files are the release's own), cryptsnap beside restic and borg:
bytes up and down and wall time per run.

The guest has no network: fetch the releases on the host first (PyPI source archives), then
run in the guest, as root:

    for v in 5.1.1 5.1.2 5.1.3 5.1.4; do
        .venv/bin/pip download -q --no-deps --no-binary :all: -d build/releases django==$v; done
    sudo python3 -m tests.harness run -- python3 -m bench.realistic /src/build/releases/Django-5.1.{1,2,3,4}.tar.gz

Run 1 is the first backup of the first release; each later run is the bump to the next one.
"changed" is what the bump rewrote: the bytes of files added or modified (by content), so
"up x" is the bytes sent per byte the release changed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import link
from bench.run import Reference, cryptsnap
from cryptsnap import meter
from cryptsnap.state import TargetState
from tests.support import udev
from tests.support.targets import make_setup


def unpack(archive: Path, into: Path) -> Path:
    """The release's tree without its versioned top directory (a checkout's name stays the same)."""
    into.mkdir(parents=True)
    subprocess.run(["tar", "-xf", str(archive), "-C", str(into), "--strip-components=1"], check=True)
    return into


def digests(root: Path) -> dict[str, tuple[int, str]]:
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            out[str(path.relative_to(root))] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def bump(old: dict, new: dict) -> dict:
    changed = [name for name in new if old.get(name) != new[name]]
    return {"files": len(new), "bytes": sum(size for size, _ in new.values()), "changed_files": len(changed),
            "changed": sum(new[name][0] for name in changed), "removed_files": len(set(old) - set(new))}  # fmt: skip


def apply(release: Path, source: Path) -> None:
    """Make `source` the release: rsync -a gives each file the archive's mtime, --delete removes what it dropped."""
    subprocess.run(["rsync", "-a", "--delete", f"{release}/", f"{source}/"], check=True)


class Cryptsnap:
    name = "cryptsnap"

    def __init__(self, server, work: Path, source: Path):
        self.setup = make_setup(work, server, size="600M", sources=[str(source)])
        cryptsnap(self.setup, "init", self.setup.name)

    def backup(self) -> tuple[int, int]:
        cryptsnap(self.setup, "backup", self.setup.name)
        record = TargetState(self.setup.load()).last_run()
        return record["bytes_up"], record["bytes_down"]


class Tool:
    """restic or borg through the same metered ssh."""

    def __init__(self, name: str, server, work: Path, source: Path):
        self.name, self.source, self.runs = name, source, 0
        self.ref = ref = Reference.prepare(server, work)
        if name == "restic":
            self.base = ref.restic()
            self.run([*self.base, "init"])
        else:
            self.repo = ref.borg_repo()
            self.run(["borg", "init", "--encryption=repokey", self.repo])

    def run(self, argv: list[str]) -> None:
        subprocess.run(argv, env=self.ref.env, check=True, stdout=subprocess.DEVNULL)

    def backup(self) -> tuple[int, int]:
        self.runs += 1
        before = meter.read(self.ref.counter)
        if self.name == "restic":
            self.run([*self.base, "backup", str(self.source)])
        else:
            self.run(["borg", "create", f"{self.repo}::run{self.runs}", str(self.source)])
        used = meter.read(self.ref.counter) - before
        return used.up, used.down


def measure(method: str, server, work: Path, releases: list[Path], bumps: list[dict]) -> list[dict]:
    place = work / method
    source = place / "tree"
    source.mkdir(parents=True)
    runner = Cryptsnap(server, place, source) if method == "cryptsnap" else Tool(method, server, place, source)
    rows = []
    for number, (release, change) in enumerate(zip(releases, bumps, strict=True), start=1):
        apply(release, source)
        started = time.monotonic()
        up, down = runner.backup()
        rows.append({"method": method, "run": number, "release": release.name, **change, "up": up, "down": down,
                     "seconds": round(time.monotonic() - started, 1)})  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict], mbit: float) -> str:
    where = f"behind {mbit:g} Mbit/s each way" if mbit else "loopback"
    lines = [f"| run | release | files | changed files | changed bytes | method | up | down | up x | down x | "
             f"wall s ({where}) |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['run']} | {r['release']} | {r['files']:,} | {r['changed_files']:,} | {r['changed']:,} | "
                     f"{r['method']} | {r['up']:,} | {r['down']:,} | {r['up'] / max(r['changed'], 1):.2f}x | "
                     f"{r['down'] / max(r['changed'], 1):.3f}x | {r['seconds']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.realistic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archives", nargs="+", type=Path, help="the releases' source archives, oldest first")
    parser.add_argument("--methods", default="cryptsnap,restic,borg", help="of cryptsnap, restic, borg")
    link.add_arguments(parser, mbit=0.0)
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    missing = [str(a) for a in args.archives if not a.is_file()]
    if missing:
        parser.error(f"no such archive: {missing[0]} (fetch the releases on the host first: see --help)")

    work = Path(tempfile.mkdtemp(prefix="cryptsnap-realistic-", dir="/var/tmp"))
    rows: list[dict] = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        releases = [unpack(a, work / "releases" / a.name.removesuffix(".tar.gz")) for a in args.archives]
        trees = [digests(r) for r in releases]
        bumps = [bump({}, trees[0])] + [bump(old, new) for old, new in zip(trees, trees[1:], strict=False)]
        if "cryptsnap" in args.methods:
            udev.install_rule()
        server = stack.enter_context(link.untrusted_host(args.link_mbit, args.rtt_ms))
        for method in filter(None, args.methods.split(",")):
            rows += measure(method, server, work, releases, bumps)
    print()
    print(table(sorted(rows, key=lambda r: (r["run"], r["method"])), args.link_mbit))
    if args.json:
        Path(args.json).write_text(json.dumps({"link_mbit": args.link_mbit, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
