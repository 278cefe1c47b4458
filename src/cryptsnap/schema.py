"""The one definition of every configuration option: type, default, description, example.

Validation (config.py), the commented example (`cryptsnap config example`) and the
option table in docs/configuration.md all come from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

REQUIRED = object()


@dataclass(frozen=True)
class Option:
    type: str  # str, int, bool, size, path, paths, strings, choice, section, named (name -> section)
    description: str
    default: Any = REQUIRED
    example: Any = None
    choices: tuple[str, ...] = ()
    minimum: int | None = None
    children: dict[str, Option] = field(default_factory=dict)  # for type "section"

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


RETENTION = {
    "last": Option("int", "Keep this many most recent snapshots.", 10, minimum=0),
    "daily": Option("int", "Keep the newest snapshot of each of this many recent days.", 7, minimum=0),
    "weekly": Option("int", "Keep the newest snapshot of each of this many recent ISO weeks.", 4, minimum=0),
    "monthly": Option("int", "Keep the newest snapshot of each of this many recent months.", 6, minimum=0),
    "make_room": Option("bool", "When a backup does not fit in the image, delete the oldest snapshot (even one "
                        "the rules keep; never the newest) and try again, one at a time, rather than fail with "
                        "exit 12. Off: a full image is for you to decide about.", False),
}

HOOKS = {
    "before": Option("strings", "Command run before each backup, as its argument list (no shell; write "
                     "[sh, -c, '...'] for one), e.g. [/usr/local/bin/dump-db, --to, /var/backups/db.sql]: "
                     "if it fails or times out, the run is skipped and fails (exit 14).", []),
    "after": Option("strings", "Command run after a successful backup, e.g. [curl, -fsS, "
                    "'https://hc.example.org/ping/ID']; its failure is logged and the run stays done.", []),
    "on_error": Option("strings", "Command run after a failed or canceled backup (not when its process was "
                       "killed: cryptsnapd records that run).", []),
    "timeout": Option("int", "Seconds a hook may run before it is stopped.", 600, minimum=1),
}

TARGET = {
    "host": Option("str", "SSH host that stores the encrypted image (untrusted).", example="backup.example.org"),
    "port": Option("int", "SSH port.", 22, minimum=1),
    "user": Option("str", "SSH user on the host; give its key only SFTP access (see `cryptsnap init`).",
                   example="backup"),
    "identity_file": Option("path", "Private SSH key used for this target (no passphrase).",
                            example="/etc/cryptsnap/id_ed25519"),
    "alive_interval": Option("int", "Seconds of silence from the server after which ssh asks whether it is "
                             "still there (ServerAliveInterval).", 15, minimum=1),
    "alive_count": Option("int", "Unanswered questions after which the connection counts as lost and the run "
                          "fails, unwinding everything: a cut link is noticed after alive_interval × "
                          "alive_count seconds (ServerAliveCountMax).", 4, minimum=1),
    "upload_limit": Option("int", "Most KiB a second a run sends to the server (0: no limit), e.g. to leave "
                           "a home uplink usable; each ssh connection of a run is limited on its own.", 0,
                           minimum=0),
    "download_limit": Option("int", "Most KiB a second a run or a restore receives (0: no limit).", 0, minimum=0),
    "require_fsync": Option("bool", "Refuse a server whose SFTP does not offer fsync@openssh.com (checked at "
                            "`cryptsnap init` and by `cryptsnap check`): without it nothing makes sure a snapshot "
                            "is on the server's disk before it is called complete, and a power cut of the server "
                            "can lose it or damage the image. false accepts that risk.", True),
    "remote_dir": Option("str", "Directory on the host that holds the image, relative to the user's home.",
                         "cryptsnap"),
    "image": Option("str", "File name of the encrypted disk image inside remote_dir.", "cryptsnap.img"),
    "size": Option("size", "Size of the image made by `cryptsnap init`, e.g. 40G; `cryptsnap resize` grows it "
                   "later.", example="40G"),
    "sparse": Option("bool", "Create the image as a sparse file instead of preallocating it "
                     "(the host then sees which blocks were ever written).", False),
    "filesystem": Option("choice", "File system inside the image: btrfs (snapshots, compression, "
                         "cheapest incremental runs), ext2 (mountable by any rescue system) or ext4.",
                         "btrfs", choices=("btrfs", "ext2", "ext4")),
    "history": Option("choice", "btrfs: how the image keeps its earlier states, chosen by `cryptsnap init`: "
                      "snapshots (btrfs subvolumes) or layers (overlayfs layers: a run writes what changed and "
                      "nothing of the tree around it, so its upload stays near the changed bytes however "
                      "large the tree: 1.17x instead of 1.79x up at 100,000 files; retention merges two layers "
                      "where it would delete a snapshot, which uploads less from 10^5 files on; a restore by "
                      "hand needs overlayfs, see docs/restore-by-hand.md). An image keeps what it was made "
                      "with; layers keep at most 499 states (the retention rules' sum).", "snapshots",
                      choices=("snapshots", "layers")),
    "metadata_cache": Option("bool", "btrfs: keep the image's metadata blocks (encrypted, as stored) in a local "
                             "cache under state_dir and serve the image through a network block device, so "
                             "a run downloads almost nothing; without the nbd kernel module, or false, the "
                             "image is attached as a loop device.", True),
    "sources": Option("paths", "Absolute local paths to back up; they keep their full path in each snapshot.",
                      example=["/etc", "/home"]),
    "excludes": Option("strings", "rsync exclude patterns (see rsync(1), FILTER RULES).", [],
                       example=["/home/*/.cache", "*.tmp"]),
    "one_file_system": Option("bool", "Do not cross file system boundaries below a source (rsync -x).", True),
    "key_file": Option("path", "File holding the LUKS key. Set this or key_credential.", None,
                       example="/etc/cryptsnap/home.key"),
    "key_credential": Option("str", "Name of a systemd credential holding the LUKS key, read from "
                             "$CREDENTIALS_DIRECTORY. Set this or key_file.", None),
    "pbkdf": Option("choice", "Key derivation for the LUKS key slot.", "argon2id",
                    choices=("argon2id", "argon2i", "pbkdf2")),
    "pbkdf_iterations": Option("int", "Force this many PBKDF iterations (pbkdf2) or this time cost "
                               "(argon2), instead of benchmarking; mainly for slow or emulated CPUs.",
                               None, minimum=1),
    "skip_unchanged": Option("bool", "btrfs: when the local record shows that nothing changed since the newest "
                             "snapshot, make no new one: the run writes nothing to the image and costs a few KB "
                             "on the wire whatever the tree's size, instead of a snapshot's commits (70-400 KB); "
                             "it is recorded as done, and the newest snapshot stays the backup of now.", False),
    "skip_on_battery": Option("bool", "Put a requested backup off while the machine runs on battery (UPower "
                              "says so); cryptsnapd starts it once on mains power. `cryptsnap backup --anyway` "
                              "does not wait.", True),
    "skip_on_metered": Option("bool", "Put a requested backup off while the network connection is metered "
                              "(NetworkManager says so, e.g. a phone's hotspot); cryptsnapd starts it once it is "
                              "not.", True),
    "reconnect_tries": Option("int", "How many more times a backup that lost its connection during the run "
                              "(server gone, network cut) tries again before it fails; btrfs, when the run copies "
                              "64 MiB or more (or compares every file): a new try goes on from what the last one "
                              "had committed to the image (every 5 minutes) instead of uploading it again. 0: "
                              "fail at once.", 3, minimum=0),
    "reconnect_delay": Option("int", "Seconds before the first new try after a lost connection; each further "
                              "wait is twice the last (60: 1, 2, 4 minutes).", 60, minimum=1),
    "notify_desktop": Option("bool", "When a backup or check run by cryptsnapd fails, show a desktop notification "
                             "(org.freedesktop.Notifications) to each user logind lists at a graphical session.",
                             False),
    "check_budget": Option("int", "How much of the image a `cryptsnap check` may download, in percent of its "
                           "size (the checks go on where the last one stopped; cryptsnap-check@NAME.timer runs "
                           "one a week).", 1, minimum=1),
    "free_space_warning": Option("int", "Warn (in the log, and in `cryptsnap status`) when less than this "
                                 "percentage of the image's file system is free after a backup: time to prune, "
                                 "exclude or `cryptsnap resize` before a run fails with exit 12.", 10, minimum=0),
    "retention": Option("section", "Which snapshots `cryptsnap prune` keeps (after each backup); "
                        "a snapshot kept by any rule stays.", None, children=RETENTION),
    "hooks": Option("section", "Commands run around each backup; they get CRYPTSNAP_TARGET, CRYPTSNAP_HOOK, "
                    "and after the run CRYPTSNAP_RESULT, CRYPTSNAP_EXIT_CODE, CRYPTSNAP_ERROR, "
                    "CRYPTSNAP_SNAPSHOT, CRYPTSNAP_BYTES_UP and CRYPTSNAP_BYTES_DOWN in their environment; "
                    "their output goes to the log (the journal).", None, children=HOOKS),
}

TOP = {
    "state_dir": Option("path", "Local state: per-target host key, LUKS header backup, run records.",
                        "/var/lib/cryptsnap"),
    "runtime_dir": Option("path", "Mount points and locks of running jobs.", "/run/cryptsnap"),
    "metrics_file": Option("str", "Prometheus metrics of every target's last run, rewritten after each run for "
                           "node_exporter's textfile collector; only written when its directory exists; empty: "
                           "never (docs/monitoring.md).", "/var/lib/prometheus/node-exporter/cryptsnap.prom"),
    "targets": Option("named", "Named backup targets; a name is lower-case letters, digits, - and _.",
                      example={"home": None}, children=TARGET),
}
