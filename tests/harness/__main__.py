"""Use the test guest by hand (run as root from the top of the checkout).

    python3 -m tests.harness shell            boot the guest with its console on this
                                              terminal, logged in as root (quit: Ctrl-a x)
    python3 -m tests.harness run -- CMD ...   boot, run CMD as root in /src, print its
                                              output, power off; exit code is CMD's
    python3 -m tests.harness build            build (or reuse) the cached guest image

In the guest the checkout is at /src (read-only) and build/vm-results at /results.
Handy inside: ``cd /src && python3 -m pytest -p no:cacheprovider tests/system -x``.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys

from .image import ensure_image
from .vm import Guest, GuestError


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
    run.add_argument("command", nargs=argparse.REMAINDER, help="command and arguments (after --)")
    sub.add_parser("build", help="build or reuse the cached guest image and print where it is")
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
    command = [c for c in args.command if c != "--"] or ["systemctl", "is-system-running", "--wait"]
    try:
        with Guest() as guest:
            print(f"guest up in {guest.boot_seconds:.1f}s ({guest.accel})", file=sys.stderr)
            result = guest.run(command, timeout=args.timeout, cwd="/src",
                               env={"PYTHONPATH": "/src/src"})  # fmt: skip
    except GuestError as exc:
        print(exc, file=sys.stderr)
        return 2
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.rc


if __name__ == "__main__":
    try:
        sys.exit(main())
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)
