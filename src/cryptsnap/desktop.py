"""Desktop notifications: tell the users at a graphical session that a backup failed.

cryptsnapd runs as root; a user's session bus accepts only that user. So for each user
logind lists with a graphical session, cryptsnapd starts this module as a short-lived
process under the user's own uid, which calls org.freedesktop.Notifications.Notify on the
bus in the user's runtime directory (logind's RuntimePath, normally /run/user/UID/bus).
Off unless a target sets notify_desktop (docs/configuration.md).

    python3 -m cryptsnap.desktop SUMMARY BODY     (as the user, with DBUS_SESSION_BUS_ADDRESS)
"""

from __future__ import annotations

import logging
import os
import pwd
import subprocess
import sys

log = logging.getLogger(__name__)

GRAPHICAL = ("x11", "wayland", "mir")
URGENCY_CRITICAL = 2


def notify_user(uid: int, runtime_path: str, summary: str, body: str) -> subprocess.Popen | None:
    """Start the notifying process as user `uid`; None if the user or their bus is not there."""
    bus = os.path.join(runtime_path, "bus")
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return None
    if not os.path.exists(bus):
        log.info("no desktop notification for %s: no session bus at %s", user.pw_name, bus)
        return None
    env = {"DBUS_SESSION_BUS_ADDRESS": f"unix:path={bus}", "HOME": user.pw_dir, "PATH": os.defpath,
           "PYTHONPATH": os.pathsep.join(sys.path)}  # fmt: skip
    return subprocess.Popen([sys.executable, "-m", "cryptsnap.desktop", summary, body], user=uid,
                            group=user.pw_gid, extra_groups=[], env=env, cwd="/",
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from gi.repository import Gio, GLib

    summary, body = (argv if argv is not None else sys.argv[1:])[:2]
    try:
        bus = Gio.bus_get_sync(Gio.BusType.SESSION, None)
        bus.call_sync("org.freedesktop.Notifications", "/org/freedesktop/Notifications",
                      "org.freedesktop.Notifications", "Notify",
                      GLib.Variant("(susssasa{sv}i)", ("cryptsnap", 0, "dialog-error", summary, body, [],
                                                       {"urgency": GLib.Variant("y", URGENCY_CRITICAL)}, -1)),
                      GLib.VariantType("(u)"), Gio.DBusCallFlags.NONE, 10000, None)  # fmt: skip
    except GLib.Error as exc:
        print(f"cryptsnap.desktop: no notification shown: {exc.message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
