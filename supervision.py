"""The serving worker ends when its supervisor dies.

BentoML starts its worker in a session of its own, so `kill -9` of `bentoml serve` (or of its
process group) would leave the worker serving, downloading and holding the port; the next start
then fails with "Address already in use". A daemon thread notices that the worker's parent is gone
(it was re-parented) and shuts the worker down: SIGTERM first, so models unload and pulls stop
cleanly, then a hard exit if that has not finished within the grace period.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
GRACE_SECONDS = 15.0
_started = False
_lock = threading.Lock()


def exit_with_parent() -> None:
    """Start the watchdog for this process (once; later calls do nothing)."""
    global _started
    with _lock:
        if _started:
            return
        _started = True
    parent = os.getppid()
    threading.Thread(target=_watch, args=(parent,), name="parent-watchdog", daemon=True).start()


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_SECONDS)
    log.error("the supervisor (pid %d) is gone: shutting this worker down", parent)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE_SECONDS)
    log.error("still running %.0fs after SIGTERM: exiting now", GRACE_SECONDS)
    os._exit(1)
