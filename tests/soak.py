"""Soak: many backups in a row through the installed cryptsnapd, each with a fault drawn by a
seeded generator, checking after every run that nothing leaked and at the end that no
snapshot was lost or changed. Runs inside the test guest (it needs dm-crypt and systemd):

    sudo make soak                                   # 200 runs, at most 90 minutes, a random seed
    sudo make soak SOAK_ARGS="--runs 50 --seed 7"    # replay: the same seed draws the same faults

Faults: none, the job's worker SIGKILLed, cryptsnapd SIGKILLed alone, the whole service
SIGKILLed (`systemctl kill -s KILL`), the server's ssh session killed, the job canceled;
each at a random phase of the run. The target tries again after a lost connection
(--reconnect-tries, default 1), as users run it. Prints one line per run and a summary, writes
/results/soak.json, and exits 1 on any lost snapshot, leaked device or process, or a
cryptsnapd whose RSS grew more than 10% over its life.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from cryptsnap.bus import target_path
from tests.support import package, sshd, trees
from tests.support.checks import cryptsnap, leftovers
from tests.support.runs import kill_server_sessions
from tests.support.service import SRV, prop, sh, wait_until
from tests.support.targets import make_setup

FAULTS = {  # name: weight
    "none": 4,
    "kill worker": 2,
    "kill daemon": 1,
    "kill service": 1,
    "cut connection": 2,
    "cancel": 1,
}
PHASES = ("connecting", "attaching", "unlocking", "mounting", "syncing", "finalizing", "unmounting")
TARGET = "org.cryptsnap1.Target"


def prepare(server, reconnect_tries: int) -> object:
    base = Path(SRV) / "soak"
    base.mkdir(parents=True, exist_ok=True)
    setup = make_setup(base, server, filesystem="btrfs", size="400M", state_dir=Path("/var/lib/cryptsnap"),
                       runtime_dir=Path("/run/cryptsnap"), alive_interval=2, alive_count=3,
                       reconnect_tries=reconnect_tries, reconnect_delay=2,
                       retention={"last": 100000, "daily": 0, "weekly": 0, "monthly": 0})  # fmt: skip
    for d in range(10):
        (setup.source / f"d{d}").mkdir(exist_ok=True)
        for f in range(20):
            (setup.source / f"d{d}" / f"f{f}").write_bytes(os.urandom(32 << 10))
    (setup.source / "big").write_bytes(os.urandom(24 << 20))
    os.makedirs("/etc/cryptsnap", exist_ok=True)
    os.replace(setup.config_path, "/etc/cryptsnap/config.yaml")
    setup.config_path = Path("/etc/cryptsnap/config.yaml")
    sh("systemctl", "restart", "cryptsnapd.service")
    cryptsnap(setup, "init", setup.name)
    return setup


def marker(setup) -> dict:
    try:
        return json.loads((setup.state_dir / setup.name / "running.json").read_text())
    except (OSError, ValueError):
        return {}


def daemon_pid() -> int:
    return int(sh("systemctl", "show", "-P", "MainPID", "cryptsnapd.service").stdout.strip() or 0)


def inject(fault: str, setup, server, job: dict) -> bool:
    """Do the fault; False if the run had ended before it could."""
    if fault == "kill worker":
        os.kill(job["pid"], signal.SIGKILL)
    elif fault == "kill daemon":
        os.kill(daemon_pid(), signal.SIGKILL)
    elif fault == "kill service":
        sh("systemctl", "kill", "--signal=SIGKILL", "cryptsnapd.service")
    elif fault == "cut connection":
        if not kill_server_sessions(server):  # (a session that ends by itself meanwhile is not an error)
            return False
    elif fault == "cancel":
        sh("busctl", "call", "org.cryptsnap1", target_path(setup.name), TARGET, "Cancel")
    return True


def settled(setup) -> bool:
    """The daemon is up (systemd restarted it if need be) and the target idle."""
    if sh("systemctl", "is-active", "cryptsnapd.service", check=False).stdout.strip() != "active":
        return False
    try:
        return prop(target_path(setup.name), TARGET, "State") == "idle"
    except AssertionError:
        return False


def main() -> int:
    parser = argparse.ArgumentParser(prog="python3 -m tests.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--minutes", type=float, default=90, help="stop starting runs after this long")
    parser.add_argument("--seed", type=int, default=None, help="default: random (printed)")
    parser.add_argument("--report", default="/results/soak.json")
    parser.add_argument("--reconnect-tries", type=int, default=1,
                        help="the target's reconnect_tries (default 1: a cut connection is tried again, as "
                             "users run it; 0 sees what one try does)")  # fmt: skip
    parser.add_argument("--faults", default=",".join(FAULTS),
                        help=f"draw only these, comma-separated (default all: {','.join(FAULTS)}); with "
                             "'none' alone, a long-lived cryptsnapd shows how its memory goes run after run")  # fmt: skip
    args = parser.parse_args()
    faults = {name.strip(): FAULTS.get(name.strip()) for name in args.faults.split(",")}
    if None in faults.values():
        parser.error(f"--faults: unknown {[name for name, weight in faults.items() if weight is None]}; "
                     f"known: {', '.join(FAULTS)}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    rng = random.Random(seed)
    print(f"soak: seed {seed} (replay with --seed {seed}), up to {args.runs} runs or {args.minutes} minutes, "
          f"reconnect_tries {args.reconnect_tries}, faults {','.join(faults)}", flush=True)
    package.install()  # the .deb `make soak` built on the host
    server = sshd.start(base=SRV)
    setup = prepare(server, args.reconnect_tries)
    started = time.monotonic()
    expected: dict[str, dict] = {}  # snapshot -> manifest of the source when it was made
    rss: dict[int, list[int]] = {}  # daemon pid -> RSS after each of its runs
    runs, leaks, problems = [], 0, []
    for number in range(1, args.runs + 1):
        if time.monotonic() - started > args.minutes * 60:
            break
        fault = rng.choices(list(faults), weights=list(faults.values()))[0]
        phase = rng.choice(PHASES)
        delay = rng.uniform(0, 0.5)
        for _ in range(3):  # a small change each run
            path = setup.source / f"d{rng.randrange(10)}" / f"f{rng.randrange(20)}"
            path.write_bytes(os.urandom(32 << 10))
        manifest = trees.across_file_systems(trees.manifest(setup.source))
        before = set(prop(target_path(setup.name), TARGET, "Snapshots"))
        t0 = time.monotonic()
        client = subprocess.Popen(["cryptsnap", "backup", "--daemon", setup.name], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)  # fmt: skip
        injected_at = None
        if fault != "none":
            deadline = time.monotonic() + 300
            while client.poll() is None and time.monotonic() < deadline:
                job = marker(setup)
                if job.get("phase") == phase:
                    time.sleep(delay)
                    job = marker(setup) or job
                    if inject(fault, setup, server, job):
                        injected_at = time.monotonic()
                    break
                time.sleep(0.01)
        try:
            _, err = client.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            client.kill()
            _, err = client.communicate()
            problems.append(f"run {number}: the client did not return within 900 s")
        ended = time.monotonic()
        wait_until(lambda: settled(setup), 600, "cryptsnapd to be up and the target idle")
        left = leftovers(setup)
        if left:
            leaks += 1
            problems.append(f"run {number} ({fault} at {phase}): left behind: {left}")
        result = prop(target_path(setup.name), TARGET, "LastResult")
        now = prop(target_path(setup.name), TARGET, "Snapshots")
        new = [name for name in now if name not in before]
        if result == "done" and new:
            expected[new[-1]] = manifest
        missing = [name for name in expected if name not in now]
        if missing:
            problems.append(f"run {number}: snapshots gone: {missing}")
        pid = daemon_pid()
        if pid:
            rss.setdefault(pid, []).append(psutil.Process(pid).memory_info().rss)
        line = {"run": number, "fault": fault, "phase": phase, "injected": injected_at is not None,
                "result": result, "exit": client.returncode, "seconds": round(ended - t0, 1),
                "fail_after": round(ended - injected_at, 1) if injected_at else None, "leaked": bool(left),
                "error": (err.strip().splitlines() or [""])[-1][:200]}  # fmt: skip
        runs.append(line)
        print(json.dumps(line), flush=True)
        if not line["injected"] and result != "done":  # nothing was done to it: a bug, not a fault
            problems.append(f"run {number}: failed with no fault injected: {line['error']}")
            if len(runs) >= 3 and all(not r["injected"] and r["result"] != "done" for r in runs[-3:]):
                problems.append(f"stopped after run {number}: three runs in a row failed with no fault injected")
                break
    # Every snapshot made, read back in full and compared with the source as it was.
    mounted = cryptsnap(setup, "mount", setup.name, expect=None)
    if mounted.returncode != 0:
        problems.append(f"the snapshots could not be read back: {mounted.stderr.strip()}")
        lost = []
    else:
        try:
            view = setup.runtime_dir / "restore" / setup.name / "snapshots"

            def intact(name: str) -> bool:
                inside = view / name / str(setup.source).lstrip("/")
                return inside.is_dir() and trees.across_file_systems(trees.manifest(inside)) == expected[name]

            lost = [name for name in expected if not intact(name)]
        finally:
            cryptsnap(setup, "umount", setup.name)
    if leftovers(setup):
        leaks += 1
    longest = max(rss.values(), key=len) if rss else []
    growth = (longest[-1] / longest[0] - 1) if len(longest) >= 2 else 0.0
    summary = {
        "seed": seed, "reconnect_tries": args.reconnect_tries, "runs": len(runs), "minutes": round((time.monotonic() - started) / 60, 1),
        "faults_injected": sum(r["injected"] for r in runs), "snapshots": len(expected), "snapshots_lost": len(lost),
        "runs_with_leaks": leaks, "daemon_restarts": len(rss) - 1 if rss else 0,
        "rss_first_mib": round(longest[0] / 2**20, 1) if longest else None,
        "rss_last_mib": round(longest[-1] / 2**20, 1) if longest else None, "rss_growth": round(growth, 3),
        "runs_of_longest_daemon": len(longest), "rss_of_longest_daemon_mib": [round(r / 2**20, 1) for r in longest],
        "by_fault": {f: sum(r["fault"] == f and r["injected"] for r in runs) for f in FAULTS},
        # a cut that the next try got over: the run ended done in spite of it
        "cuts_tried_again_done": sum(r["fault"] == "cut connection" and r["injected"] and r["result"] == "done"
                                     for r in runs),
        "max_fail_after": max((r["fail_after"] for r in runs if r["fail_after"] is not None), default=None),
        "problems": problems + [f"snapshot {name} lost or changed" for name in lost],
    }  # fmt: skip
    print("soak summary: " + json.dumps(summary), flush=True)
    try:
        Path(args.report).write_text(json.dumps({"summary": summary, "runs": runs}, indent=1) + "\n")
    except OSError as exc:
        print(f"soak: could not write {args.report}: {exc}", file=sys.stderr)
    sshd.stop(server)
    failed = lost or leaks or problems or growth > 0.10
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
