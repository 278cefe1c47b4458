"""ssh's cipher: MiB/s of a stream through ssh to a loopback sshd, cipher by cipher.

    python3 -m bench.cipher_lab --mib 256 --rounds 2      # in the guest or on the host, as root

cryptsnap writes its own ssh configuration and leaves the cipher to OpenSSH's default order
(chacha20-poly1305 first). This measures whether another cipher would carry the image's bytes
faster where the processors are the limit: `ssh -c CIPHER host 'wc -c'` with --mib MiB of
random bytes on stdin (the count checked), both ends on this machine (an sshd with throwaway
keys, tests.support.sshd), the ciphers alternating round by round. Also prints `openssl speed` of
the two AEAD ciphers where openssl is installed (the cipher alone, one processor).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import time

from tests.support import sshd

CIPHERS = ("chacha20-poly1305@openssh.com", "aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr")


def openssl_speed() -> list[str]:
    if not shutil.which("openssl"):
        return ["(no openssl here)"]
    lines = []
    for cipher in ("aes-128-gcm", "chacha20-poly1305"):
        out = subprocess.run(["openssl", "speed", "-seconds", "2", "-bytes", "16384", "-evp", cipher],
                             capture_output=True, text=True, check=True).stdout  # fmt: skip
        lines.append(out.strip().splitlines()[-1] + "  (kB/s, 16 KiB blocks)")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.cipher_lab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="MiB sent through ssh per cipher and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ciphers", default=",".join(CIPHERS), help="comma-separated, as `ssh -Q cipher` lists")
    args = parser.parse_args(argv)
    with open("/proc/cpuinfo") as info:
        flags = next((line for line in info if line.startswith(("flags", "Features"))), "").split()
    print(f"processor AES instructions: {'yes' if 'aes' in flags else 'no'}", flush=True)
    for line in openssl_speed():
        print(line, flush=True)
    server = sshd.start()
    blob = tempfile.NamedTemporaryFile(dir="/var/tmp", prefix="cipher-lab-")
    try:
        for _ in range(args.mib):
            blob.write(os.urandom(1 << 20))
        blob.flush()
        for round_ in range(1, args.rounds + 1):
            for cipher in args.ciphers.split(","):
                argv_ = server.ssh_argv("wc -c")
                argv_[1:1] = ["-c", cipher]
                before, started = os.times(), time.monotonic()
                with open(blob.name, "rb") as stream:
                    got = subprocess.run(argv_, stdin=stream, check=True, capture_output=True, text=True).stdout
                wall, after = time.monotonic() - started, os.times()
                if int(got) != args.mib << 20:
                    raise SystemExit(f"{cipher}: the server got {got.strip()} bytes of {args.mib << 20}")
                client = after.children_user + after.children_system - before.children_user - before.children_system
                print(f"round {round_}: {cipher}: {args.mib / wall:.1f} MiB/s ({wall:.1f} s; the ssh client "
                      f"{client:.1f} processor-s)", flush=True)
    finally:
        blob.close()
        sshd.stop(server)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
