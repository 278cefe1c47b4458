"""Use the test guest by hand (run as root from the top of the checkout).

    python3 -m tests.harness shell            boot the guest with its console on this
                                              terminal, logged in as root (quit: Ctrl-a x)
    python3 -m tests.harness run -- CMD ...   boot, run CMD as root in /src, print its
                                              output, power off; exit code is CMD's
    python3 -m tests.harness build            build (or reuse) the cached guest image
    python3 -m tests.harness demo             the cryptsnap demo (demo/demo.sh) in a fresh guest

In the guest the checkout is at /src (read-only) and build/vm-results at /results.
Handy inside: ``cd /src && python3 -m pytest -p no:cacheprovider tests/system -x``.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.support import package

from .image import ensure_image
from .vm import PYTHON_ENV, REPO, Guest, GuestError, with_local_src


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m tests.harness",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("shell", help="boot the guest and attach its console to this terminal")
    run = sub.add_parser("run", help="boot the guest, run one command, power off")
    run.add_argument("--timeout", type=float, default=1800, help="seconds (default 1800)")
    run.add_argument("--results", type=Path, help="host directory shared as /results (default build/vm-results)")
    run.add_argument("--disk", type=Path, action="append", default=[],
                     help="a raw image the guest sees as /dev/vdb (then vdc...); its writes are thrown away")
    run.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments (after --)")
    sub.add_parser("build", help="build or reuse the cached guest image and print where it is")
    sub.add_parser("demo", help="run demo/demo.sh in a fresh guest, showing its output as it goes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if args.action == "build":
        image = ensure_image()
        print(image.directory, "(built now)" if image.built_now else "(cached)")
        return 0
    if args.action == "shell":
        guest = Guest(interactive=True).start()
        try:
            return guest.proc.wait()
        finally:
            guest.kill()
    if args.action == "demo":
        return demo()
    command = [c for c in args.command if c != "--"] or ["systemctl", "is-system-running", "--wait"]
    missing = [str(disk) for disk in args.disk if not disk.is_file()]
    if missing:
        parser.error(f"--disk {missing[0]}: no such file (bench.scan_cache make builds one)")
    try:
        package.build()  # what the guest's service tests install (tests/support/package.py)
    except RuntimeError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        with Guest(results=args.results, disks=tuple(args.disk)) as guest:
            print(f"guest up in {guest.boot_seconds:.1f}s ({guest.accel})", file=sys.stderr)
            result = guest.run(with_local_src(shlex.join(command)), timeout=args.timeout, cwd="/src", env=PYTHON_ENV)
    except GuestError as exc:
        print(exc, file=sys.stderr)
        return 2
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.rc


def demo() -> int:
    """Boot a guest, run demo/demo.sh in it, and print its log while it runs (over the 9p share)."""
    results = REPO / "build" / "demo-results"
    started = time.monotonic()
    print("Booting a throwaway Debian 12 guest (QEMU; the first run also builds its image)...", flush=True)
    with Guest(results=results) as guest:
        print(f"Guest up after {time.monotonic() - started:.0f}s ({guest.accel}). Running demo/demo.sh in it:\n",
              flush=True)
        log = results / "demo.log"
        done = threading.Event()

        def tail():
            position = 0
            while not done.is_set() or (log.exists() and log.stat().st_size > position):
                if log.exists():
                    with open(log, "rb") as f:
                        f.seek(position)
                        chunk = f.read()
                        position += len(chunk)
                    sys.stdout.write(chunk.decode("utf-8", "replace"))
                    sys.stdout.flush()
                done.wait(0.5)

        reader = threading.Thread(target=tail, daemon=True)
        reader.start()
        try:
            result = guest.run("bash /src/demo/demo.sh > /results/demo.log 2>&1", timeout=1800, cwd="/src")
        finally:
            done.set()
            reader.join(timeout=10)
    print(f"\nDemo {'finished' if result.rc == 0 else f'FAILED (exit {result.rc})'} in "
          f"{time.monotonic() - started:.0f}s. Its log: {results / 'demo.log'}; the guest's journal: "
          f"{results / 'journal.txt'}")
    return result.rc


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)
