"""A stand-in for systemd-logind on a private bus: Inhibit (returning the descriptor that holds
the inhibitor, as logind does: the inhibitor lasts until every copy of it is closed),
ListInhibitors, and the PrepareForSleep / PrepareForShutdown signals, sent when a test calls
org.cryptsnap.test.Logind.Announce(what, starting)
(what "nap": sleep and wake at once, as when logind's delay ran out before the run closed). Raw Gio, because the reply of Inhibit
carries a file descriptor, which pydbus cannot send. Run: python3 -m tests.support.logind_standin ADDRESS"""

from __future__ import annotations

import os
import sys

from gi.repository import Gio, GLib

XML = """<node>
  <interface name="org.freedesktop.login1.Manager">
    <method name="Inhibit">
      <arg name="what" type="s" direction="in"/><arg name="who" type="s" direction="in"/>
      <arg name="why" type="s" direction="in"/><arg name="mode" type="s" direction="in"/>
      <arg name="fd" type="h" direction="out"/>
    </method>
    <method name="ListInhibitors"><arg name="inhibitors" type="a(ssssuu)" direction="out"/></method>
    <method name="ListSessions"><arg name="sessions" type="a(susso)" direction="out"/></method>
    <method name="GetUser"><arg name="uid" type="u" direction="in"/><arg name="user" type="o" direction="out"/></method>
    <signal name="PrepareForSleep"><arg name="start" type="b"/></signal>
    <signal name="PrepareForShutdown"><arg name="start" type="b"/></signal>
  </interface>
  <interface name="org.cryptsnap.test.Logind">
    <method name="Announce"><arg name="what" type="s" direction="in"/><arg name="start" type="b" direction="in"/></method>
  </interface>
</node>"""
SESSION_XML = """<node><interface name="org.freedesktop.login1.Session">
  <property name="Type" type="s" access="read"/><property name="Class" type="s" access="read"/>
</interface></node>"""
USER_XML = """<node><interface name="org.freedesktop.login1.User">
  <property name="RuntimePath" type="s" access="read"/>
</interface></node>"""
PATH = "/org/freedesktop/login1"


class Logind:
    def __init__(self, connection: Gio.DBusConnection, sessions: list[tuple[int, str, str]]):
        self.connection = connection
        self.inhibitors: dict[int, tuple] = {}  # our end of the pipe -> (what, who, why, mode, uid, pid)
        self.sessions = sessions  # (uid, type, runtime path)

    def call(self, connection, sender, path, interface, method, params, invocation) -> None:
        if method == "Inhibit":
            what, who, why, mode = params.unpack()
            ours, theirs = os.pipe()
            credentials = connection.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                                               "GetConnectionUnixProcessID", GLib.Variant("(s)", (sender,)),
                                               None, Gio.DBusCallFlags.NONE, -1, None)  # fmt: skip
            self.inhibitors[ours] = (what, who, why, mode, os.getuid(), credentials.unpack()[0])
            # Released when the holder closes its copy: our end then reads end of file.
            GLib.unix_fd_add_full(GLib.PRIORITY_DEFAULT, ours, GLib.IOCondition.IN | GLib.IOCondition.HUP,
                                  self._released)  # fmt: skip
            fds = Gio.UnixFDList.new_from_array([theirs])  # the list owns `theirs` now
            invocation.return_value_with_unix_fd_list(GLib.Variant("(h)", (0,)), fds)
        elif method == "ListSessions":
            listed = [(str(n), uid, f"user{uid}", "seat0", f"{PATH}/session/_{n}")
                      for n, (uid, _type, _runtime) in enumerate(self.sessions)]  # fmt: skip
            invocation.return_value(GLib.Variant("(a(susso))", (listed,)))
        elif method == "GetUser":
            invocation.return_value(GLib.Variant("(o)", (f"{PATH}/user/_{params.unpack()[0]}",)))
        elif method == "ListInhibitors":
            invocation.return_value(GLib.Variant("(a(ssssuu))", (list(self.inhibitors.values()),)))
        elif method == "Announce":  # what: sleep, shutdown; or "nap": sleep and wake at once
            asked = params.unpack()
            for what, start in [("sleep", True), ("sleep", False)] if asked[0] == "nap" else [asked]:
                connection.emit_signal(None, PATH, "org.freedesktop.login1.Manager", f"PrepareFor{what.title()}",
                                       GLib.Variant("(b)", (start,)))  # fmt: skip
            invocation.return_value(None)

    def _released(self, fd: int, condition) -> bool:
        del self.inhibitors[fd]
        os.close(fd)
        return False


def main() -> None:
    """ADDRESS [UID:TYPE:RUNTIME_PATH ...]: the sessions it lists (type x11, wayland, tty...)."""
    connection = Gio.DBusConnection.new_for_address_sync(
        sys.argv[1], Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION,
        None, None)  # fmt: skip
    sessions = [(int(uid), kind, runtime) for uid, kind, runtime in (arg.split(":", 2) for arg in sys.argv[2:])]
    logind = Logind(connection, sessions)
    for interface in Gio.DBusNodeInfo.new_for_xml(XML).interfaces:
        connection.register_object(PATH, interface, logind.call, None, None)
    session_interface = Gio.DBusNodeInfo.new_for_xml(SESSION_XML).interfaces[0]
    user_interface = Gio.DBusNodeInfo.new_for_xml(USER_XML).interfaces[0]
    for n, (uid, kind, runtime) in enumerate(sessions):
        values = {"Type": kind, "Class": "user"}
        connection.register_object(f"{PATH}/session/_{n}", session_interface, None,
                                   lambda *args, v=values: GLib.Variant("s", v[args[4]]), None)  # fmt: skip
        connection.register_object(f"{PATH}/user/_{uid}", user_interface, None,
                                   lambda *args, r=runtime: GLib.Variant("s", r), None)  # fmt: skip
    connection.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "RequestName",
                         GLib.Variant("(su)", ("org.freedesktop.login1", 4)), None, Gio.DBusCallFlags.NONE, -1, None)  # fmt: skip
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
