"""Reloading the callers file and the admin key without a restart.

A reload reads the keys afresh (``load``: the callers file, and the settings file for
``admin.key_sha256``) and swaps them into the ``KeyRing`` only if everything is valid; an
invalid file keeps the keys in force and logs why. Reloads come from SIGHUP (installed by
``isales-gateway serve``) and from a watcher that polls the files' identity: a ConfigMap
update swaps the ``..data`` symlink, which changes the inode the path resolves to, and an
in-place edit changes the size or mtime. Each reload is counted by result.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Sequence

from gateway.auth import AccessKeys, KeyRing
from gateway.clock import Clock
from gateway.errors import ConfigError
from gateway.metrics import GatewayMetrics

log = logging.getLogger("gateway.reload")

Fingerprint = tuple[tuple[str, int, int, int, int] | None, ...]


def fingerprint(paths: Sequence[str]) -> Fingerprint:
    """What identifies each file's content (None for a missing file), symlinks followed."""
    found: list[tuple[str, int, int, int, int] | None] = []
    for path in paths:
        try:
            real = os.path.realpath(path)
            st = os.stat(real)
        except OSError:
            found.append(None)
            continue
        found.append((real, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(found)


class KeyReloader:
    def __init__(
        self,
        ring: KeyRing,
        load: Callable[[], AccessKeys],
        *,
        paths: Sequence[str],
        metrics: GatewayMetrics,
        clock: Clock,
        interval_s: float,
    ) -> None:
        self._ring = ring
        self._load = load
        self._paths = tuple(p for p in paths if p)
        self._metrics = metrics
        self._clock = clock
        self._interval = interval_s
        self._seen = fingerprint(self._paths)
        self._publish(ring.current)

    def reload(self, why: str) -> bool:
        """Load the keys again; True if the new set is in force, False if the old one stays."""
        self._seen = fingerprint(self._paths)
        try:
            keys = self._load()
        except ConfigError as exc:
            self._metrics.config_reloads.labels("failure").inc()
            log.error(
                "reload (%s) failed, keeping the keys in force: %s",
                why,
                exc.message,
                extra={"reload": why, "result": "failure", "error": exc.message},
            )
            return False
        self._ring.replace(keys)
        self._metrics.config_reloads.labels("success").inc()
        self._publish(keys)
        callers = 0 if keys.callers is None else len(keys.callers.callers)
        log.info(
            "reload (%s): %d callers, admin key %s",
            why,
            callers,
            "set" if keys.admin_sha256 else "unset",
            extra={"reload": why, "result": "success", "callers": callers},
        )
        return True

    def _publish(self, keys: AccessKeys) -> None:
        self._metrics.config_reload_time.set(self._clock.time())
        self._metrics.callers.set(0 if keys.callers is None else len(keys.callers.callers))

    async def watch(self) -> None:
        """Reload whenever a watched file changes; runs until cancelled."""
        if not self._paths or self._interval <= 0:
            return
        while True:
            await self._clock.sleep(self._interval)
            if fingerprint(self._paths) != self._seen:
                self.reload("file changed")

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        """SIGHUP reloads; it never stops the process."""
        loop.add_signal_handler(signal.SIGHUP, self.reload, "SIGHUP")
