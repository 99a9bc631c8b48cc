"""What the service manager sees of the converter (systemd, Type=notify): its notifications (READY=1,
RELOADING=1, STOPPING=1, WATCHDOG=1) and the watchdog period it asks for. The supervisor sends them
(mimbox.converter.workers); workers never do."""
from __future__ import annotations

import os


class Notifier:
    """systemd's notification socket (sd_notify(3), through the sdnotify library); silent when
    NOTIFY_SOCKET is not set. The variable is taken out of the environment: workers never notify."""

    def __init__(self):
        self.notifier = None
        if os.environ.get("NOTIFY_SOCKET"):
            import sdnotify
            self.notifier = sdnotify.SystemdNotifier()
            os.environ.pop("NOTIFY_SOCKET")

    def __call__(self, *lines: str) -> None:
        if self.notifier is not None:
            self.notifier.notify("\n".join(lines))


def watchdog_period() -> float | None:
    """Seconds between watchdog pings: a third of WatchdogSec= (WATCHDOG_USEC), None if the service
    manager asks for none or asks another process (WATCHDOG_PID)."""
    usec, pid = os.environ.pop("WATCHDOG_USEC", None), os.environ.pop("WATCHDOG_PID", None)
    if not usec or (pid and int(pid) != os.getpid()):
        return None
    return max(int(usec) / 3e6, 0.05)
