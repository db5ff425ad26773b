"""A worker's accept loop on the listening socket the workers share: up to ACCEPT_BATCH
connections each time the loop sees the socket readable, each handed to the loop as an accepted
socket with its own protocol.

Why not the loop's own server (`create_server(sock=...)`): measured with wrk holding 1,000
kept-alive connections busy through one worker, uvloop's server took about one connection from
the kernel's accept queue per turn of a loop that busy: 194 waiting at 0.4 s, 71 still waiting at
10 s (p99 5.9 s, 73 wrk timeouts in 15 s; nginx: p99 121 ms). With a batch per turn the queue
is empty at the first look (0.3 s): p99 509 ms, 0 timeouts; what remains is one Python worker's
throughput shared by 1,000 clients (p50 159 ms). Bounded, so the rest of a burst is left to the
other workers, which wake on the same socket.

Must never: block (the socket is non-blocking; an empty queue ends the batch), or let an error of
one accept stop the others (out of descriptors: the batch ends and the next turn tries again).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable

ACCEPT_BATCH = 256
PAUSE_S = 1.0
log = logging.getLogger("vllm_dp_supervisor.router")


class Acceptor:
    def __init__(self, listen: socket.socket, protocol: Callable[[], asyncio.Protocol], backlog: int) -> None:
        self._listen = listen
        self._protocol = protocol
        self._backlog = backlog
        self._loop: asyncio.AbstractEventLoop | None = None
        self._said: int | None = None
        self._handing: set[asyncio.Task[None]] = set()  # kept: a task nobody holds may be collected

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._listen.listen(self._backlog)  # the workers' listen again: each sets the backlog
        self._loop.add_reader(self._listen.fileno(), self._accept)

    def stop(self) -> None:
        """No more connections (the drain); those accepted stay."""
        if self._loop is not None:
            self._loop.remove_reader(self._listen.fileno())
            self._loop = None

    def _accept(self) -> None:
        loop = self._loop
        if loop is None:
            return
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._listen.accept()
            except (BlockingIOError, InterruptedError):
                return  # the queue is empty (or another worker took it)
            except OSError as exc:
                if exc.errno == errno.EINVAL:  # the supervisor shut the socket down: the drain
                    self.stop()
                elif exc.errno not in (errno.ECONNABORTED, errno.EPROTO):  # EMFILE, ENFILE, ENOBUFS, ...
                    self._pause(exc)
                return
            self._said = None
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as the loop's own server sets it
            task = loop.create_task(self._serve(loop, conn))
            self._handing.add(task)
            task.add_done_callback(self._handing.discard)

    def _pause(self, exc: OSError) -> None:
        """Out of descriptors or buffers: the socket stays readable, and accepting again at once
        would spin the loop. Not accepting for PAUSE_S, as asyncio's own server does; said once."""
        if exc.errno != self._said:
            self._said = exc.errno
            log.warning("cannot accept connections for %.0f s: %s", PAUSE_S, exc.strerror)
        loop = self._loop
        if loop is not None:
            loop.remove_reader(self._listen.fileno())
            loop.call_later(PAUSE_S, self._resume, loop)

    def _resume(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop:  # not stopped meanwhile
            loop.add_reader(self._listen.fileno(), self._accept)

    @property
    def handing(self) -> int:
        """Connections accepted, not yet handed to their protocol (a drain waits for them)."""
        return len(self._handing)

    async def _serve(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        try:
            await loop.connect_accepted_socket(self._protocol, conn)
        except Exception as exc:  # it went away before it was served, or worse: it goes, nothing else
            if not isinstance(exc, OSError):
                log.warning("a connection could not be served: %r", exc)
            conn.close()
