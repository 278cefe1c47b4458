"""A stand-in for a desktop's notification daemon (org.freedesktop.Notifications) on a user's
session bus: prints each Notify call as a JSON line. Runs as the user whose bus it is.
Run: DBUS_SESSION_BUS_ADDRESS=... python3 -m tests.support.notifications_standin"""

from __future__ import annotations

import json
import os

import pydbus
from gi.repository import GLib


class Notifications:
    """<node><interface name="org.freedesktop.Notifications">
         <method name="Notify">
           <arg type="s" direction="in"/><arg type="u" direction="in"/><arg type="s" direction="in"/>
           <arg type="s" direction="in"/><arg type="s" direction="in"/><arg type="as" direction="in"/>
           <arg type="a{sv}" direction="in"/><arg type="i" direction="in"/><arg type="u" direction="out"/>
         </method>
       </interface></node>"""

    def Notify(self, app, replaces, icon, summary, body, actions, hints, timeout):  # noqa: N802 (D-Bus name)
        print(json.dumps({"app": app, "icon": icon, "summary": summary, "body": body,
                          "urgency": hints.get("urgency"), "uid": os.getuid()}), flush=True)  # fmt: skip
        return 1


def main() -> None:
    bus = pydbus.SessionBus()
    bus.publish("org.freedesktop.Notifications", Notifications())
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
