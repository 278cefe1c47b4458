"""The D-Bus side of cryptsnap: the only module that imports pydbus.

BusExporter publishes a Daemon as org.cryptsnap1 (objects as in org.cryptsnap1.xml) and
turns its events into signals; BusClient is what `cryptsnap status` / `backup` use to
talk to a running daemon. Domain errors become named D-Bus errors here, in one place.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import time
import xml.etree.ElementTree as ET
from importlib import resources

import pydbus
from gi.repository import Gio, GLib
from pydbus.generic import signal

from . import __version__, desktop
from .errors import AccessDenied, Busy, ConfigError, CryptsnapError, NoSuchTarget

log = logging.getLogger(__name__)

BUS_NAME = "org.cryptsnap1"
UPOWER, NETWORK_MANAGER = "org.freedesktop.UPower", "org.freedesktop.NetworkManager"
LOGIND, LOGIND_PATH = "org.freedesktop.login1", "/org/freedesktop/login1"
LOGIND_MANAGER = "org.freedesktop.login1.Manager"
MANAGER_PATH = "/org/cryptsnap1"
ADMIN_GROUP = "cryptsnap"


def interface_xml() -> str:
    return resources.files("cryptsnap").joinpath("org.cryptsnap1.xml").read_text()


def _interface(name: str) -> str:
    """One interface of the contract, as the node XML pydbus registers."""
    root = ET.fromstring(interface_xml())
    for element in root.iter("interface"):
        if element.get("name") == name:
            return f"<node>{ET.tostring(element, encoding='unicode')}</node>"
    raise KeyError(name)


def escape_path_element(name: str) -> str:
    """Like sd_bus_path_encode: letters and digits stay, every other byte becomes _XX."""
    return "".join(c if c.isascii() and c.isalnum() else "".join(f"_{b:02x}" for b in c.encode()) for c in name)


def target_path(name: str) -> str:
    return f"{MANAGER_PATH}/target/{escape_path_element(name)}"


# Python exceptions whose class name has dots are sent by pydbus under that error name.
_ERROR_CLASSES: dict[str, type] = {}


def bus_error(name: str, message: str) -> Exception:
    cls = _ERROR_CLASSES.setdefault(name, type(name, (Exception,), {}))
    return cls(message)


class _ExpectedErrors(logging.Filter):
    """pydbus logs a traceback for every error a method returns; ours are expected: one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and type(record.exc_info[1]).__name__.startswith(f"{BUS_NAME}.Error."):
            record.msg = f"%s.%s(): {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
            record.exc_info = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


logging.getLogger("pydbus.registration").addFilter(_ExpectedErrors())


def _leaks_invocations() -> bool:
    """Whether this GLib hands each call's GDBusMethodInvocation to a Python handler with a
    reference nobody drops. g_dbus_connection_register_object_with_closures() (what pydbus's
    register_object is, through PyGObject) passes it as `transfer full` and PyGObject takes a
    reference of its own, so every call, a property read included, left about 2 KiB behind:
    18.7 MiB after 10,000 calls, a year of a monitor polling every 10 s would be 6 GiB
    (tests/host/test_daemon.py measures it). GLib 2.82.3 alone changed those semantics (undone
    in 2.82.4); 2.84 added register_object_with_closures2 with the right ones instead."""
    version = (GLib.MAJOR_VERSION, GLib.MINOR_VERSION, GLib.MICRO_VERSION)
    return version != (2, 82, 3) and not hasattr(Gio.DBusConnection, "register_object_with_closures2")


def _release_invocations() -> None:
    """Drop GLib's reference to each call's invocation once pydbus's handler is done with it
    (the workaround gtk-rs and dasbus users apply; PyGObject's own reference keeps it alive
    for as long as Python holds it)."""
    import ctypes

    from pydbus import registration

    gobject = ctypes.CDLL("libgobject-2.0.so.0")
    gobject.g_object_unref.argtypes = [ctypes.c_void_p]
    call_method = registration.ObjectWrapper.call_method

    def call_and_release(self, connection, sender, object_path, interface_name, method_name, parameters, invocation):
        try:
            return call_method(self, connection, sender, object_path, interface_name, method_name, parameters,
                               invocation)  # fmt: skip
        finally:
            gobject.g_object_unref(hash(invocation))  # PyGObject hashes a GObject by its address

    registration.ObjectWrapper.call_method = call_and_release


def _drop_unregistered_objects() -> None:
    """An unregistered object's method closure is never freed (PyGObject), and through it
    pydbus's wrapper kept the object alive: every job's JobObject and what it held, and the
    TargetObjects of each reload. Once the wrapper is unregistered it lets go of them; about
    1.8 KiB a registration still stays (the wrapper and the closure), 10.3 MiB before over
    2,000 registrations, 3.5 MiB now."""
    from pydbus import registration

    unwrap = registration.ObjectWrapper.__exit__

    def unwrap_and_drop(self, *exc):
        try:
            return unwrap(self, *exc)
        finally:
            self.object = self.outargs = self.readable_properties = self.writable_properties = None

    registration.ObjectWrapper.__exit__ = unwrap_and_drop


if _leaks_invocations():
    _release_invocations()
_drop_unregistered_objects()


def _translated(call):
    """Run a bus method; raise domain errors as their named D-Bus errors."""
    try:
        return call()
    except CryptsnapError as exc:
        raise bus_error(exc.dbus_name, str(exc)) from None


class _Object:
    PropertiesChanged = signal()

    def __init__(self, exporter: BusExporter):
        self.exporter = exporter

    def _authorize(self, dbus_context) -> None:
        self.exporter.authorize(dbus_context.sender)


class ManagerObject(_Object):
    JobNew = signal()
    JobRemoved = signal()

    def ListTargets(self):
        daemon = self.exporter.daemon
        return [(name, target_path(name), daemon.target_properties(name)["State"]) for name in daemon.target_names()]

    def ListJobs(self):
        return [(job.id, job.target, job.phase, job.path) for job in self.exporter.daemon.jobs.values()]

    def GetTarget(self, name):
        return _translated(lambda: self.exporter.daemon.target(name) and target_path(name))

    @property
    def Version(self):
        return __version__


class TargetObject(_Object):
    def __init__(self, exporter: BusExporter, name: str):
        super().__init__(exporter)
        self.name = name

    def _property(self, key):
        return _translated(lambda: self.exporter.daemon.target_properties(self.name)[key])

    def StartBackup(self, options, dbus_context=None):
        self._authorize(dbus_context)
        job = _translated(lambda: self.exporter.daemon.start_backup(self.name, options))
        return job.path if job else "/"  # "/": put off by the target's conditions (Deferred)

    def StartCheck(self, options, dbus_context=None):
        self._authorize(dbus_context)
        return _translated(lambda: self.exporter.daemon.start_check(self.name).path)

    def ListSnapshots(self):
        return self._property("Snapshots")

    def Cancel(self, dbus_context=None):
        self._authorize(dbus_context)
        _translated(lambda: self.exporter.daemon.cancel_target(self.name))

    Name = property(lambda self: self.name)
    State = property(lambda self: self._property("State"))
    LastResult = property(lambda self: self._property("LastResult"))
    LastSuccess = property(lambda self: self._property("LastSuccess"))
    LastAttempt = property(lambda self: self._property("LastAttempt"))
    LastError = property(lambda self: self._property("LastError"))
    LastExitCode = property(lambda self: self._property("LastExitCode"))
    BytesUploaded = property(lambda self: self._property("BytesUploaded"))
    BytesDownloaded = property(lambda self: self._property("BytesDownloaded"))
    ImageSize = property(lambda self: self._property("ImageSize"))
    ImageFree = property(lambda self: self._property("ImageFree"))
    Snapshots = property(lambda self: self._property("Snapshots"))
    Job = property(lambda self: self._property("Job"))
    Deferred = property(lambda self: self._property("Deferred"))
    LastCheck = property(lambda self: self._property("LastCheck"))
    LastCheckTime = property(lambda self: self._property("LastCheckTime"))
    LastCheckError = property(lambda self: self._property("LastCheckError"))
    LastCheckExitCode = property(lambda self: self._property("LastCheckExitCode"))

    @property
    def NextElapse(self):
        return self.exporter.next_elapse(self.name)


class JobObject(_Object):
    def __init__(self, exporter: BusExporter, job):
        super().__init__(exporter)
        self.job = job

    def Cancel(self, dbus_context=None):
        self._authorize(dbus_context)
        self.exporter.daemon.cancel(self.job)

    Id = property(lambda self: self.job.id)
    Target = property(lambda self: self.job.target)
    Phase = property(lambda self: self.job.phase)
    Progress = property(lambda self: float(self.job.progress))
    BytesTransferred = property(lambda self: int(self.job.transferred))
    StartTime = property(lambda self: int(self.job.start_time * 1_000_000))


class BusExporter:
    """Publishes the daemon on the bus and relays its events (a daemon.Listener)."""

    def __init__(self, daemon, address: str | None = None):
        self.daemon = daemon
        self.bus = pydbus.connect(address) if address else pydbus.SystemBus()
        self.manager = ManagerObject(self)
        self.registrations: dict[str, object] = {}
        self.targets: dict[str, TargetObject] = {}
        self.jobs: dict[int, JobObject] = {}
        self.name = None

    def publish(self) -> None:
        self.registrations[MANAGER_PATH] = self.bus.register_object(
            MANAGER_PATH, self.manager, _interface("org.cryptsnap1.Manager"))
        self.targets_changed(self.daemon)
        self.name = self.bus.request_name(BUS_NAME, allow_replacement=False, replace=False)

    def close(self) -> None:
        for registration in self.registrations.values():
            registration.unregister()
        self.registrations.clear()
        if self.name:
            self.name.unown()

    def authorize(self, sender: str) -> None:
        uid = self.bus.dbus.GetConnectionUnixUser(sender)
        if uid == 0:
            return
        try:
            group = grp.getgrnam(ADMIN_GROUP)
            user = pwd.getpwuid(uid)
            if user.pw_name in group.gr_mem or user.pw_gid == group.gr_gid:
                return
        except KeyError:
            pass
        raise bus_error(AccessDenied.dbus_name,
                        f"uid {uid} may not start or cancel backups: only root and members of group {ADMIN_GROUP}")

    def next_elapse(self, name: str) -> int:
        """When the target's timer fires next, from systemd; 0 when there is no timer or no systemd."""
        try:
            systemd = self.bus.get("org.freedesktop.systemd1")
            unit_path = systemd.GetUnit(f"cryptsnap-backup@{name}.timer")
            timer = self.bus.get("org.freedesktop.systemd1", unit_path)
            return int(timer.NextElapseUSecRealtime)
        except Exception:  # no systemd on this bus, timer not loaded: unknown
            return 0

    def power_and_network(self) -> tuple[bool | None, bool | None]:
        """(on battery, on a metered connection) from UPower and NetworkManager; None: unknown
        (the service is not there, e.g. a server without them: nothing is put off)."""
        on_battery = metered = None
        try:
            on_battery = bool(self.bus.get(UPOWER, "/org/freedesktop/UPower").OnBattery)
        except Exception:
            pass
        try:  # NMMetered: 1 yes, 3 guessed yes; 2 no, 4 guessed no; 0 unknown
            metered = {1: True, 3: True, 2: False, 4: False}.get(int(self.bus.get(NETWORK_MANAGER).Metered))
        except Exception:
            pass
        return on_battery, metered

    def watch_power_and_network(self, changed) -> None:
        """Call changed() when UPower or NetworkManager report a change of their properties."""
        for path in ("/org/freedesktop/UPower", "/org/freedesktop/NetworkManager"):
            self.bus.subscribe(iface="org.freedesktop.DBus.Properties", signal="PropertiesChanged", object=path,
                               signal_fired=lambda *_args: changed())  # fmt: skip

    def take_inhibitor(self, why: str) -> int | None:
        """A logind delay inhibitor for sleep and shutdown: the descriptor that holds it (close it
        to release), or None without logind. logind then waits for it (InhibitDelayMaxSec, 5 s
        by default) after announcing PrepareForSleep / PrepareForShutdown."""
        try:  # the descriptor comes in the reply's fd list, which pydbus does not pass on
            reply, fds = self.bus.con.call_with_unix_fd_list_sync(
                LOGIND, LOGIND_PATH, LOGIND_MANAGER, "Inhibit",
                GLib.Variant("(ssss)", ("sleep:shutdown", "cryptsnap", why, "delay")), GLib.VariantType("(h)"),
                Gio.DBusCallFlags.NONE, 5000, None, None)  # fmt: skip
            return fds.steal_fds()[reply.unpack()[0]]
        except GLib.Error as exc:
            log.debug("no sleep/shutdown inhibitor (logind): %s", exc.message)
            return None

    def watch_sleep_and_shutdown(self, prepare) -> None:
        """Call prepare(what, starting) on logind's PrepareForSleep / PrepareForShutdown:
        what is "sleep" or "shutdown"; starting is False when the machine woke up (or the
        shutdown was called off)."""
        for what in ("sleep", "shutdown"):
            self.bus.subscribe(sender=LOGIND, iface=LOGIND_MANAGER, signal=f"PrepareFor{what.title()}",
                               object=LOGIND_PATH,
                               signal_fired=lambda *args, what=what: prepare(what, bool(args[4][0])))  # fmt: skip

    def notify_desktop(self, summary: str, body: str) -> None:
        """A desktop notification to every user logind lists with a graphical session."""
        try:
            manager = self.bus.get(LOGIND, LOGIND_PATH)
            uids = sorted({uid for _id, uid, _name, _seat, path in manager.ListSessions()
                           if self.bus.get(LOGIND, path).Type in desktop.GRAPHICAL})  # fmt: skip
            users = [(uid, self.bus.get(LOGIND, manager.GetUser(uid)).RuntimePath) for uid in uids]
        except Exception as exc:  # no logind on this bus (a server): nobody to tell
            log.debug("no desktop notification: cannot list sessions: %s", exc)
            return
        for uid, runtime_path in users:
            try:
                process = desktop.notify_user(uid, runtime_path, summary, body)
            except OSError as exc:
                log.warning("no desktop notification for uid %d: %s", uid, exc)
                continue
            if process:
                log.info("desktop notification to uid %d: %s", uid, summary)
                GLib.child_watch_add(GLib.PRIORITY_DEFAULT, process.pid, lambda *_args, p=process: p.poll())

    # -- daemon.Listener ----------------------------------------------------------------

    def targets_changed(self, daemon) -> None:
        names = set(daemon.target_names())
        for name in list(self.targets):
            if name not in names:
                self.registrations.pop(target_path(name)).unregister()
                del self.targets[name]
        for name in sorted(names - set(self.targets)):
            obj = TargetObject(self, name)
            self.targets[name] = obj
            self.registrations[target_path(name)] = self.bus.register_object(
                target_path(name), obj, _interface("org.cryptsnap1.Target"))

    def target_changed(self, name: str, properties: dict) -> None:
        obj = self.targets.get(name)
        if obj is not None:
            obj.PropertiesChanged("org.cryptsnap1.Target", properties, [])

    def job_new(self, job) -> None:
        obj = JobObject(self, job)
        self.jobs[job.id] = obj
        self.registrations[job.path] = self.bus.register_object(job.path, obj, _interface("org.cryptsnap1.Job"))
        self.manager.JobNew(job.id, job.path, job.target)

    def job_changed(self, job, properties: dict) -> None:
        obj = self.jobs.get(job.id)
        if obj is not None:
            obj.PropertiesChanged("org.cryptsnap1.Job", properties, [])

    def job_removed(self, job, result: str) -> None:
        self.jobs.pop(job.id, None)
        registration = self.registrations.pop(job.path, None)
        if registration is not None:
            registration.unregister()
        self.manager.JobRemoved(job.id, job.path, job.target, result)


class BusClient:
    """Talk to a running cryptsnapd (the CLI's `status` and `backup`)."""

    def __init__(self, address: str | None = None):
        address = address or os.environ.get("CRYPTSNAP_BUS_ADDRESS")
        self.bus = pydbus.connect(address) if address else pydbus.SystemBus()

    @classmethod
    def reachable(cls) -> BusClient | None:
        """A client when the daemon runs or can be activated; None otherwise."""
        try:
            client = cls()
            names = client.bus.dbus.ListNames() + client.bus.dbus.ListActivatableNames()
        except GLib.Error:
            return None
        return client if BUS_NAME in names else None

    def _call(self, call):
        try:
            return call()
        except GLib.Error as exc:
            # cryptsnapd exits when idle after an upgrade (cryptsnap.upgrades): a call that reached
            # it just then was never handled, so asking again (which activates the new version) is safe.
            if "disconnected from message bus without replying" not in str(exc):
                raise _domain_error(exc) from None
        time.sleep(1)
        try:
            return call()
        except GLib.Error as exc:
            raise _domain_error(exc) from None

    def target(self, name: str):
        path = self._call(lambda: self.bus.get(BUS_NAME, MANAGER_PATH).GetTarget(name))
        return self.bus.get(BUS_NAME, path)

    def targets(self) -> list[str]:
        return [name for name, _, _ in self._call(lambda: self.bus.get(BUS_NAME, MANAGER_PATH).ListTargets())]

    def properties(self, name: str) -> dict:
        obj = self.target(name)
        return self._call(lambda: obj.GetAll("org.cryptsnap1.Target"))

    def start_check(self, name: str) -> str:
        obj = self.target(name)
        return self._call(lambda: obj.StartCheck({}))

    def start_backup(self, name: str, options: dict | None = None) -> str:
        obj = self.target(name)
        variants = {key: GLib.Variant("b", bool(value)) for key, value in (options or {}).items()}
        return self._call(lambda: obj.StartBackup(variants))

    def follow(self, job_path: str, on_change, on_signal=None) -> str:
        """Call on_change(properties) as the job advances; return its result when it ends.

        Returns "lost" when cryptsnapd leaves the bus (killed, restarted) before the job's end:
        the job died with it. on_signal(): called on SIGINT or SIGTERM; following stops ("abandoned")
        when it returns True.
        """
        loop = GLib.MainLoop()
        outcome = {}

        def removed(job_id, path, target, result):
            if path == job_path:
                outcome["result"] = result
                loop.quit()

        def changed(sender, path, interface, signal_name, parameters):
            iface, props, _ = parameters
            if path == job_path and iface == "org.cryptsnap1.Job":
                on_change(props)

        def owner_changed(name, old, new):
            if name == BUS_NAME and old == owner:
                outcome.setdefault("result", "lost")
                loop.quit()

        def signaled():
            if on_signal is None or on_signal():
                outcome.setdefault("result", "abandoned")
                loop.quit()
            return True

        manager = self.bus.get(BUS_NAME, MANAGER_PATH)
        owner = self._call(lambda: self.bus.dbus.GetNameOwner(BUS_NAME))
        sources = [GLib.unix_signal_add(GLib.PRIORITY_HIGH, number, signaled) for number in (2, 15)]  # INT, TERM
        try:
            with manager.JobRemoved.connect(removed), self.bus.dbus.NameOwnerChanged.connect(owner_changed), \
                    self.bus.subscribe(sender=BUS_NAME, iface="org.freedesktop.DBus.Properties",
                                       signal="PropertiesChanged", object=job_path, signal_fired=changed):  # fmt: skip
                try:  # the job may have ended (or the daemon gone) before we subscribed
                    self.bus.get(BUS_NAME, job_path).GetAll("org.cryptsnap1.Job")
                    if self.bus.dbus.GetNameOwner(BUS_NAME) != owner:
                        return "lost"
                except GLib.Error:
                    return ""
                loop.run()
        finally:
            for source in sources:
                GLib.source_remove(source)
        return outcome.get("result", "")

    def cancel_job(self, job_path: str) -> None:
        self._call(lambda: self.bus.get(BUS_NAME, job_path).Cancel())


def _domain_error(exc: GLib.Error) -> CryptsnapError:
    """The domain error for a D-Bus error reply (GDBus puts the error name in the message)."""
    name, _, message = (exc.message or "").partition(": ")
    name = name.removeprefix("GDBus.Error:")
    if name == Busy.dbus_name:
        return Busy(message)
    if name == NoSuchTarget.dbus_name:
        return ConfigError([message])
    if name.endswith(".AccessDenied"):
        return AccessDenied(message)
    return CryptsnapError(exc.message)
