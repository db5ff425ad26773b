"""Signals: the handler only queues (it runs between two callbacks of the loop and must not
act); one task dispatches each to `handle_<name>`, or logs that it ignores it.

TERM, INT, HUP: stop (a second one kills at once); QUIT: stop, killing at once; USR1: /status to
the log; USR2: debug logging on and off; CHLD: reap orphans. Which signals are installed is
`cli.HANDLED_SIGNALS`: every one whose default would end the supervisor without its orderly stop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Callable
from typing import Any

from vllm_dp_supervisor.core.machine import Machine
from vllm_dp_supervisor.settings.config import Config

log = logging.getLogger("supervisor")


class Signals:
    def __init__(self, config: Config, machine: Machine, status: Callable[[], dict[str, Any]],
                 reap_orphans: Callable[[], None]) -> None:
        """`status`: /status's body, which SIGUSR1 logs; `reap_orphans`: what SIGCHLD runs."""
        self._config = config
        self._machine = machine
        self._status = status
        self._reap_orphans = reap_orphans
        self._queue: asyncio.Queue[int] = asyncio.Queue()

    def post(self, signum: int) -> None:
        """Installed with loop.add_signal_handler; does nothing but queue."""
        self._queue.put_nowait(signum)

    async def dispatch(self) -> None:
        while True:
            signum = await self._queue.get()
            name = signal.Signals(signum).name
            handler = getattr(self, "handle_" + name[3:].lower(), None)
            if handler is None:
                log.warning("ignoring %s", name)
            else:
                handler()

    def handle_term(self) -> None:
        self._machine.request_stop("SIGTERM received", signal.SIGTERM, second_kills=True)

    def handle_int(self) -> None:
        self._machine.request_stop("SIGINT received", signal.SIGINT, second_kills=True)

    def handle_hup(self) -> None:
        # No reload: a hang-up means the terminal went away. Ranks get the signal they drain on.
        self._machine.request_stop("SIGHUP received", signal.SIGTERM, second_kills=True)

    def handle_quit(self) -> None:
        # A stop without the grace: every rank is SIGKILLed at once, the rest is as orderly.
        self._machine.request_stop("SIGQUIT received", signal.SIGTERM)
        self._machine.kill_at_once("SIGQUIT: killing every rank now, without waiting --stop-timeout")

    def handle_usr1(self) -> None:
        status = self._status()
        log.info("status (SIGUSR1): %s", json.dumps(status),
                 extra={"fields": {"status": status}, "json_message": "status (SIGUSR1)"})

    def handle_usr2(self) -> None:
        root = logging.getLogger()
        debug = root.level != logging.DEBUG
        root.setLevel(logging.DEBUG if debug else self._config.log_level.upper())
        log.info("log level %s (SIGUSR2)", "debug" if debug else self._config.log_level)

    def handle_chld(self) -> None:
        self._reap_orphans()
