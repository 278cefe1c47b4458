"""Where the processor time of a timed action went: each process started during it, by what it
is (a Python process by its module: `cryptsnap.nbd` is the block device server; the kernel's
threads by name: dm-crypt's, btrfs's, the workqueues'), and the whole machine's busy and idle
time; what no process shows (interrupts, processes too short to be sampled) is the rest.

A process profile, not a function profile: it says which process limits a transfer (one
near 100% of a processor, or the machine near all its processors busy) or that none does
(the time waits on the link).
"""

from __future__ import annotations

import collections
import os
import threading

import psutil


def label(cmdline: list[str], name: str) -> str:
    """What a process is: `python3 -m MODULE` by its module, a kernel thread (no command line)
    by its name's stem (`kworker/u4:2-kcryptd/253:0` is a kworker), others by their name."""
    if "-m" in cmdline[:-1] and os.path.basename(cmdline[0]).startswith("python"):
        return cmdline[cmdline.index("-m") + 1]
    return name if cmdline else name.split("/")[0]


class CpuSampler:
    """Samples, every `interval` seconds, the processor time of every process: what each spent
    since it began (a process that ended meanwhile counts up to its last sample: up to
    `interval` of it is missed). As a context manager around the action."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.at_start: dict[tuple[int, float], float] = {}
        self.seconds: dict[tuple[int, float], tuple[str, float]] = {}
        self.labels: dict[tuple[int, float], str] = {}
        self.done = threading.Event()

    def __enter__(self) -> CpuSampler:
        self.machine = psutil.cpu_times()
        self._take(self.at_start)
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _take(self, into: dict | None = None) -> None:
        # Cheap enough to run beside what is measured: /proc/PID/stat for each process, and
        # the command line once for a process not seen before.
        for process in psutil.process_iter(["create_time", "cpu_times"]):
            info = process.info
            if info["cpu_times"] is None:
                continue
            key = (process.pid, info["create_time"])
            spent = info["cpu_times"].user + info["cpu_times"].system
            if into is not None:
                into[key] = spent
                continue
            if key not in self.labels:
                try:
                    mine = process.pid == os.getpid()
                    self.labels[key] = "the benchmark" if mine else label(process.cmdline(), process.name())
                except psutil.Error:
                    continue
            self.seconds[key] = (self.labels[key], spent - self.at_start.get(key, 0.0))

    def _sample(self) -> None:
        while not self.done.wait(self.interval):
            self._take()
        self._take()

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        after = psutil.cpu_times()
        self.busy = _busy(after) - _busy(self.machine)

    def by_label(self) -> dict[str, float]:
        totals: dict[str, float] = collections.Counter()
        for what, spent in self.seconds.values():
            totals[what] += spent
        return dict(sorted(totals.items(), key=lambda item: -item[1]))

    def summary(self, wall: float) -> str:
        """Seconds of processor time by process (the kernel's threads by their name's stem:
        `kworker`, `dmcrypt_write`...), and the machine's busy share of its processors."""
        processes = self.by_label()
        shown = ", ".join(f"{what} {spent:.1f}" for what, spent in processes.items() if spent >= 0.5)
        rest = self.busy - sum(processes.values())
        processors = psutil.cpu_count() or 1
        return (f"processor s: {shown}; interrupts and what was missed {max(rest, 0):.1f}; "
                f"machine busy {self.busy / (wall * processors):.0%} of {processors} processors")


def _idle(times) -> float:
    return times.idle + getattr(times, "iowait", 0.0)


def _busy(times) -> float:
    # Linux counts a guest's time (guest, guest_nice) in user and nice already.
    return sum(times) - _idle(times) - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)
