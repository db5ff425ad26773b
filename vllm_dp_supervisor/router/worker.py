"""A router worker process: `python -m vllm_dp_supervisor.router.worker`, started by the
supervisor (workers.py), never by hand.

It accepts on the listening socket it inherits, and talks to the supervisor over a Unix socket
(`channel.py`): views of the ready ranks come in; what it saw and its counters go out. It dies
with the supervisor (PR_SET_PDEATHSIG, set before exec) and ends when the channel closes. On a
`drain` message it stops accepting, lets its requests finish, closes its connections and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Sequence

from vllm_dp_supervisor.router import protocol as channel
from vllm_dp_supervisor.router.balance import RouterPolicy
from vllm_dp_supervisor.router.client import ClientConnection
from vllm_dp_supervisor.router.proxy import Router, Settings
from vllm_dp_supervisor.router.stats import WorkerStats

STATS_INTERVAL_S = 0.5  # also how often stalls are looked for
STALL_REPEAT_S = 1.0
DRAIN_POLL_S = 0.02
# At a drain, answers carry `connection: close`, so clients let go of their connections; one that
# stays idle this long is closed by us. Not at once: a client may be sending its next request on
# it right now, and would see the connection die under it.
DRAIN_IDLE_S = 1.0


class Worker:
    def __init__(self, settings: Settings, listen: socket.socket, chan: socket.socket) -> None:
        self._settings = settings
        self._listen = listen
        self._chan = chan
        self.stats = WorkerStats()
        self.connections: set[ClientConnection] = set()
        self._writer: asyncio.StreamWriter | None = None
        self.router = Router(settings, self.stats, self._unreachable, self._load)
        self._reported: dict[int, float] = {}
        self._stall_said: dict[int, float] = {}
        self._view_version = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_after_shutdown)
        reader, self._writer = await asyncio.open_unix_connection(sock=self._chan, limit=channel.MAX_LINE)
        server = await loop.create_server(
            lambda: ClientConnection(self.router.handle, self._settings.max_body, self._rejected, self.connections),
            sock=self._listen)
        stats = asyncio.ensure_future(self._send_stats())
        try:
            async for message in channel.read(reader):
                if "view" in message:
                    self._view_version = int(message["view"].get("v", 0))
                    self.router.update(channel.ready_ranks(message["view"]))
                elif "drain" in message:
                    await self._drain(server, float(message["drain"]))
                    break
            # the channel closed: the supervisor is gone, or drained us
        finally:
            stats.cancel()
            server.close()
            self._send_stats_now()
            with contextlib.suppress(Exception):
                await self._writer.drain()
            self.router.pool.close()

    async def _drain(self, server: asyncio.Server, budget: float) -> None:
        """Stop accepting; close idle connections; let answers under way finish, for `budget` s."""
        server.close()
        deadline = time.monotonic() + budget
        for conn in list(self.connections):
            conn.closing = True
        while self.connections and time.monotonic() < deadline:
            for conn in list(self.connections):
                if conn.idle() and time.monotonic() - conn.idle_since >= DRAIN_IDLE_S:
                    conn.close()
            await asyncio.sleep(DRAIN_POLL_S)

    async def _send_stats(self) -> None:
        while True:
            await asyncio.sleep(STATS_INTERVAL_S)
            self._send_stats_now()
            self._report_stalls()

    def _report_stalls(self) -> None:
        """A ready rank that holds requests and sends nothing back: the supervisor judges it.
        Said once a second per rank while it lasts (the supervisor ignores repeats)."""
        now = time.monotonic()
        for rank, (quiet, held) in self.router.stalled(now).items():
            ready = self.router.ready.get(rank)
            if ready is not None and now - self._stall_said.get(rank, 0.0) >= STALL_REPEAT_S:
                self._stall_said[rank] = now
                self._send({"stalled": [rank, ready[1], round(quiet, 3), held]})

    def _send_stats_now(self) -> None:
        balancer = self.router.balancer
        self._send({"stats": self.stats.message(balancer.inflight, balancer.placed)})

    def _load(self) -> None:
        """Which view this worker routes by, and what it has in flight per rank."""
        inflight = {str(k): n for k, n in self.router.balancer.inflight.items() if n}
        stalled = sorted(self.router.stalled(time.monotonic()))
        self._send({"load": {"v": self._view_version, "inflight": inflight, "stalled": stalled}})

    def _unreachable(self, rank: int, attempt: int, why: str) -> None:
        now = time.monotonic()
        if now - self._reported.get(rank, 0.0) < 0.1:
            return  # one report per rank per 100 ms is enough to wake its probe
        self._reported[rank] = now
        self._send({"unreachable": [rank, attempt, why]})

    def _rejected(self, status: int) -> None:
        self.stats.rejected[str(status)] += 1

    def _send(self, message: dict) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")


def _quiet_after_shutdown(loop: asyncio.AbstractEventLoop, context: dict) -> None:
    """At the drain the supervisor shuts the shared listening socket down for every process at
    once; an accept already under way in this one then fails with EINVAL. That is the stop, not an
    error (the stock loop would log a traceback for it)."""
    exc = context.get("exception")
    if isinstance(exc, OSError) and exc.errno == errno.EINVAL and "accept" in str(context.get("message", "")) + \
            str(context.get("handle", "")):
        return
    loop.default_exception_handler(context)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm_dp_supervisor.router.worker")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--policy", type=RouterPolicy, required=True)
    parser.add_argument("--queue-timeout", type=float, required=True)
    parser.add_argument("--retries", type=int, required=True)
    parser.add_argument("--max-body", type=int, required=True)
    parser.add_argument("--prefix-chars", type=int, required=True)
    parser.add_argument("--session-header", required=True)
    parser.add_argument("--load-bound", type=float, required=True)
    parser.add_argument("--stall-timeout", type=float, required=True)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    # The terminal's ^C and the pod's SIGTERM are for the supervisor, which drains us in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    settings = Settings(args.host, args.policy, args.queue_timeout, args.retries, args.max_body,
                        args.prefix_chars, args.session_header.encode(), args.load_bound, args.stall_timeout)
    listen = socket.socket(fileno=args.listen_fd)
    listen.setblocking(False)
    chan = socket.socket(fileno=args.channel_fd)
    try:
        import uvloop
    except ImportError:  # not on this platform: the stock loop works, a little slower
        asyncio.run(Worker(settings, listen, chan).run())
    else:
        uvloop.run(Worker(settings, listen, chan).run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
