"""Guest side of the test harness: runs commands for the host over a virtio-serial port.

Started by ``cryptsnap-test-agent.service`` inside the guest. The protocol is one JSON
object per line each way. A request is ``{"id": N, "argv": [...], "timeout": S,
"env": {...}, "cwd": "..."}``; the answer carries the same id with ``rc``, ``stdout``
and ``stderr``. ``{"id": N, "ping": true}`` is answered at once, so the host can tell
when the guest is up. Only the standard library: this runs under the guest's python3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def handle(request: dict) -> dict:
    if request.get("ping"):
        with open("/proc/sys/kernel/random/boot_id") as f:
            return {"id": request["id"], "pong": True, "boot_id": f.read().strip()}
    env = dict(os.environ)
    env.update(request.get("env") or {})
    started = time.monotonic()
    try:
        proc = subprocess.run(
            request["argv"],
            capture_output=True,
            env=env,
            cwd=request.get("cwd") or "/",
            timeout=request.get("timeout"),
            stdin=subprocess.DEVNULL,
        )
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out, err = -9, exc.stdout or b"", (exc.stderr or b"") + b"\n[agent] command timed out\n"
    except OSError as exc:
        rc, out, err = 127, b"", f"[agent] {exc}\n".encode()
    return {
        "id": request["id"],
        "rc": rc,
        "stdout": out.decode("utf-8", "replace"),
        "stderr": err.decode("utf-8", "replace"),
        "seconds": round(time.monotonic() - started, 3),
    }


def main(port: str) -> None:
    while not os.path.exists(port):  # udev creates the node shortly after boot
        time.sleep(0.2)
    fd = os.open(port, os.O_RDWR)
    reader = os.fdopen(fd, "rb", buffering=0)
    buffer = b""
    while True:
        chunk = reader.read(65536)
        if not chunk:  # host side not connected yet: the port reads EOF; wait and retry
            time.sleep(0.2)
            continue
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if not line.strip():
                continue
            try:
                answer = handle(json.loads(line))
            except Exception as exc:  # a broken request must not kill the agent
                answer = {"id": None, "rc": 126, "stdout": "", "stderr": f"[agent] {exc!r}\n"}
            data = (json.dumps(answer) + "\n").encode()
            while data:
                written = os.write(fd, data)
                data = data[written:]


if __name__ == "__main__":
    main(sys.argv[1])
