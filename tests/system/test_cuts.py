"""The connection cut at seeded points of runs, many runs per file system.

Each seed aims at a phase with a kind of cut, the seeds walking through every pair, and draws
a delay into the phase. The kinds: the server's side of ssh killed (the connection closes) or
the server's network link taken down (silence: no reset, no close, only ssh's keepalive
notices). After each cut: the run failed within the keepalive limit (or succeeded, if the
cut came too late to matter), its error names the phase, nothing is left open, and the next
run succeeds. At the end every snapshot holds what its source held when it was taken, and
no partial one is there (the last run removed them). A run cut off after its snapshot was
named, before the commit that makes the name durable, says that the snapshot may be there
all the same; if it is, it must hold what its source held too.

Replay one seed: CRYPTSNAP_CUT_SEEDS=1 CRYPTSNAP_CUT_FIRST_SEED=N (the failure message says N).
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import time
from dataclasses import dataclass

import pytest

from bench.link import NETNS, SERVER_SIDE, shaped_link
from tests.support import figures, sshd, trees
from tests.support.checks import assert_nothing_left, cryptsnap
from tests.support.runs import PHASES, digests, kill_server_sessions, marker, start_local_backup
from tests.support.targets import make_setup

KINDS = ("kill", "silence")
ROUND = len(PHASES) * len(KINDS)  # seeds that aim at every phase with each kind once
FIRST_SEED = int(os.environ.get("CRYPTSNAP_CUT_FIRST_SEED", "0"))
# Each seed is two runs (one if the cut missed), 20 to 40 s on the emulated CPU. The default is
# one round of every phase with each kind of cut (14 seeds, 5 to 8 minutes per file system);
# more with CRYPTSNAP_CUT_SEEDS (docs/reliability.md), up to about 30 a run on ext2, whose
# 160 MiB image then fills.
SEEDS = range(FIRST_SEED, FIRST_SEED + int(os.environ.get("CRYPTSNAP_CUT_SEEDS", str(ROUND))))
ALIVE_INTERVAL, ALIVE_COUNT = 1, 3
CONNECT_TIMEOUT = 20  # commands.py: ssh's ConnectTimeout, what a silent server costs before a session exists


@dataclass(frozen=True)
class Cut:
    seed: int
    phase: str  # cut once the run is in this phase...
    delay: float  # ...and this many seconds later
    kind: str  # "kill": the server's sshd sessions SIGKILLed; "silence": its link down

    @classmethod
    def draw(cls, seed: int) -> Cut:
        """Any ROUND seeds in a row aim at every phase with each kind of cut once; only the
        delay is drawn. (When the phase and the kind were drawn too, seeds 0-19 aimed at 10
        of the 14 pairs: never a kill in connecting or finalizing, never a silence in syncing
        or unmounting.)"""
        phase = PHASES[seed % len(PHASES)]
        kind = KINDS[seed // len(PHASES) % len(KINDS)]
        return cls(seed, phase, round(random.Random(seed).uniform(0, 0.5), 2), kind)

    def limit(self) -> float:
        """How long after the cut the run may take to fail: the keepalive limit (or ssh's
        connect timeout before a session exists), plus 10 s to unwind."""
        if self.kind == "kill":
            return 10
        return (CONNECT_TIMEOUT if self.phase == "connecting" else ALIVE_INTERVAL * ALIVE_COUNT) + 10


def set_link(state: str) -> None:
    subprocess.run(["ip", "netns", "exec", NETNS, "ip", "link", "set", SERVER_SIDE, state], check=True)


def cut_during(setup, server, proc: subprocess.Popen, cut: Cut) -> str | None:
    """Wait for the cut's phase (or any later one), then cut; the phase the run was in, or
    None if the run ended first."""
    later = PHASES[PHASES.index(cut.phase) :]
    while proc.poll() is None and marker(setup).get("phase") not in later:
        time.sleep(0.02)
    time.sleep(cut.delay)
    if proc.poll() is not None:
        return None
    phase = marker(setup).get("phase")
    if cut.kind == "kill":
        kill_server_sessions(server)
    else:
        set_link("down")
    return phase


def change(source, rng: random.Random) -> None:
    """A run's worth of change: a few new files of up to 4 MiB, one rewritten, one deleted."""
    for _ in range(rng.randint(1, 3)):
        (source / f"f{rng.getrandbits(32):08x}").write_bytes(rng.randbytes(rng.randint(1, 4 << 20)))
    files = sorted(source.iterdir())
    files[rng.randrange(len(files))].write_bytes(rng.randbytes(64 << 10))
    if len(files) > 4:
        files[rng.randrange(len(files))].unlink()


# btrfs-layers: history: layers, keeping 4 states, so that most runs merge two layers in
# finalizing (make test-long; tests/system/test_layered.py in make test).
@pytest.mark.parametrize("filesystem", ["btrfs", "ext2", pytest.param("btrfs-layers", marks=pytest.mark.long)])
def test_the_connection_cut_at_seeded_points(tmp_path, filesystem):
    filesystem, _, history = filesystem.partition("-")
    layered = {"history": "layers", "retention": {"last": 4, "daily": 0, "weekly": 0, "monthly": 0}}
    with shaped_link(1000, rtt_ms=0.2) as address:
        server = sshd.start(address=address, netns=NETNS)
        try:
            setup = make_setup(tmp_path, server, filesystem=filesystem, size="160M", alive_interval=ALIVE_INTERVAL,
                               alive_count=ALIVE_COUNT, **(layered if history else {}))  # fmt: skip
            cryptsnap(setup, "init", setup.name)
            held: dict[str, dict] = {}  # snapshot -> what its source held when it was taken
            # A run failed after its snapshot was named, before the commit (a cut in finalizing):
            # it says the snapshot may be there all the same; if it is, it holds its source.
            maybe: dict[str, dict] = {}

            def took_snapshot(output: str) -> None:
                held[re.search(r": snapshot (\S+) complete", output)[1]] = trees.manifest(setup.source)

            (setup.source / "first").write_text("before the cuts\n")
            took_snapshot(cryptsnap(setup, "backup", setup.name).stdout)
            outcomes = []
            for seed in SEEDS:
                cut = Cut.draw(seed)
                change(setup.source, random.Random(seed))
                proc = start_local_backup(setup)
                phase = cut_during(setup, server, proc, cut)
                cut_at = time.monotonic()
                try:
                    out, err = proc.communicate(timeout=300)
                finally:
                    set_link("up")
                took = time.monotonic() - cut_at
                context = f"seed {seed} ({cut}), cut in {phase}: exit {proc.returncode}\n{err}"
                if proc.returncode == 0:  # the cut missed: the run was done with the connection, or had none yet
                    took_snapshot(out)
                    outcomes.append((cut, phase, "missed", 0))
                else:
                    assert proc.returncode == 5, context
                    failed_in = err.split("error: ", 1)[-1].split(":", 1)[0]
                    assert failed_in in PHASES and (phase is None or PHASES.index(failed_in) >= PHASES.index(phase)), context
                    lost = f"{failed_in}: lost the connection to {address}" in err
                    unreached = failed_in == "connecting" and "connecting: cannot reach " in err  # no session yet
                    assert lost or unreached, context
                    assert took < cut.limit(), f"failed {took:.1f} s after the cut, limit {cut.limit()} s; {context}"
                    outcomes.append((cut, phase, failed_in, took))
                    if named := re.search(r"; snapshot (\S+) may be on the server all the same, complete", err):
                        assert failed_in in ("finalizing", "unmounting"), context
                        maybe[named[1]] = trees.manifest(setup.source)
                assert_nothing_left(setup, context)
                next_run = "none needed (the run was done)"
                if proc.returncode != 0:  # after a missed cut, the next seed's run is the next run
                    started = time.monotonic()
                    took_snapshot(cryptsnap(setup, "backup", setup.name).stdout)  # the next run succeeds
                    next_run = f"{time.monotonic() - started:.1f} s"
                print(f"seed {seed}: {cut}, cut in {phase}: {outcomes[-1][2]} after {took:.1f} s; "
                      f"the next run: {next_run}", flush=True)
            found = digests(setup)
            assert set(found) - set(held) <= set(maybe), f"snapshots no run reported: {set(found) - set(held)}"
            held |= {name: maybe[name] for name in set(found) - set(held)}
            if history:  # retention dropped all but the last 4 (a view's directories: overlayfs's sizes)
                newest = sorted(held)[-4:]
                assert sorted(found) == newest, f"kept {sorted(found)}, the newest four are {newest}"
                found = {name: trees.across_file_systems(tree) for name, tree in found.items()}
                held = {name: trees.across_file_systems(held[name]) for name in found}
            assert found == held, "a snapshot does not hold what its source held when it was taken"
            assert_nothing_left(setup)
            failed = [o for o in outcomes if o[2] != "missed"]
            figures.record(f"connection cut at seeded points, {filesystem}{history and ' with layers'}",
                           seeds=len(outcomes), failed=len(failed),
                           phases=sorted({o[2] for o in failed}),
                           max_fail_s={kind: round(max([o[3] for o in failed if o[0].kind == kind], default=0), 1)
                                       for kind in ("kill", "silence")})  # fmt: skip
            assert len(failed) >= len(outcomes) // 2, f"most cuts missed the run: {outcomes}"
        finally:
            sshd.stop(server)
