"""Stand-ins for UPower and NetworkManager on a private bus: only the properties cryptsnapd
reads (OnBattery, Metered), settable with busctl set-property, announced with
PropertiesChanged as the real services do. Run: python3 -m tests.support.power_standin ADDRESS"""

from __future__ import annotations

import sys

import pydbus
from gi.repository import GLib
from pydbus.generic import signal


class UPower:
    """<node><interface name="org.freedesktop.UPower">
         <property name="OnBattery" type="b" access="readwrite"/>
       </interface></node>"""

    PropertiesChanged = signal()

    def __init__(self):
        self._on_battery = True

    @property
    def OnBattery(self):
        return self._on_battery

    @OnBattery.setter
    def OnBattery(self, value):
        self._on_battery = value
        self.PropertiesChanged("org.freedesktop.UPower", {"OnBattery": value}, [])


class NetworkManager:
    """<node><interface name="org.freedesktop.NetworkManager">
         <property name="Metered" type="u" access="readwrite"/>
       </interface></node>"""

    PropertiesChanged = signal()

    def __init__(self):
        self._metered = 4  # guessed not metered

    @property
    def Metered(self):
        return self._metered

    @Metered.setter
    def Metered(self, value):
        self._metered = value
        self.PropertiesChanged("org.freedesktop.NetworkManager", {"Metered": value}, [])


def main() -> None:
    bus = pydbus.connect(sys.argv[1])
    bus.publish("org.freedesktop.UPower", ("/org/freedesktop/UPower", UPower()))
    bus.publish("org.freedesktop.NetworkManager", ("/org/freedesktop/NetworkManager", NetworkManager()))
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
