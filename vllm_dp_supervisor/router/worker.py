"""A router worker process: `python -m vllm_dp_supervisor.router.worker`, started by the
supervisor (router_workers/workers.py), never by hand.

It accepts on the listening socket it inherits, and talks to the supervisor over a Unix socket
(`protocol.py`): its settings, then views of the ready ranks come in; what it saw and its
counters go out. It dies
with the supervisor (PR_SET_PDEATHSIG, set before exec) and ends when the channel closes. On a
`drain` message it stops accepting, lets its requests finish, closes its connections and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import TYPE_CHECKING

from vllm_dp_supervisor.router import policies, protocol
from vllm_dp_supervisor.router.accept import Acceptor
from vllm_dp_supervisor.router.client import ClientConnection, Request
from vllm_dp_supervisor.router.passage import Passage
from vllm_dp_supervisor.router.proxy import Router
from vllm_dp_supervisor.router.stats import WorkerStats
from vllm_dp_supervisor.settings.config import RouterSettings

if TYPE_CHECKING:
    from vllm_dp_supervisor.router.tracing import Tracing

log = logging.getLogger("vllm_dp_supervisor.router.worker")
STATS_INTERVAL_S = 0.5
STALLS_EVERY_S = 0.1  # how often stalls are looked for: a hung engine leaves rotation within ~1 s
STALL_REPEAT_S = 1.0
DRAIN_POLL_S = 0.02
# At a drain, answers carry `connection: close`, so clients let go of their connections; one that
# stays idle this long is closed by us. Not at once: a client may be sending its next request on
# it right now, and would see the connection die under it.
DRAIN_IDLE_S = 1.0
# A drain that lasts says what it waits for this often: the pod's stop is waiting on it.
DRAIN_SAY_S = 5.0


class Worker:
    def __init__(self, settings: RouterSettings, listen: socket.socket, writer: asyncio.StreamWriter) -> None:
        """`writer`: the channel to the supervisor, its settings message read already."""
        self._settings = settings
        self._listen = listen
        self._writer = writer
        self.stats = WorkerStats()
        self.connections: set[ClientConnection] = set()
        self.router = Router(settings, self.stats, policies.build(settings), self._unreachable, self._load,
                             self._resumed, _tracing(settings))
        self._reported: dict[int, float] = {}
        self._stall_said: dict[int, float] = {}
        self._view_version = 0

    async def run(self, messages: AsyncIterator[dict]) -> None:
        """Serve until the supervisor drains us or goes away. `messages`: the channel's, after
        the settings."""
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_quiet_after_shutdown)
        server = Acceptor(
            self._listen, lambda: ClientConnection(self._answer, self._settings.max_body, self._rejected,
                                                   self.connections), self._settings.backlog)
        server.start()
        stats = asyncio.ensure_future(self._send_stats())
        try:
            async for message in messages:
                if (view := protocol.read_view(message)) is not None:
                    self._view_version = view.version
                    self.router.policy.follow(view.engines)
                    self.router.update(view.ready)
                elif (ranks := protocol.read_hand_off(message)) is not None:
                    self.router.hand_off(ranks)
                elif (budget := protocol.read_drain(message)) is not None:
                    await self._drain(server, budget)
                    break
            # the channel closed: the supervisor is gone, or drained us
        finally:
            stats.cancel()
            server.stop()
            self._send_stats_now()
            with contextlib.suppress(Exception):
                await self._writer.drain()
            self.router.pool.close()
            self.router.policy.close()
            if self.router.tracing is not None:
                self.router.tracing.close()

    def _answer(self, client: ClientConnection, request: Request) -> Awaitable[bool]:
        return Passage(self.router, client, request).run()

    async def _drain(self, server: Acceptor, budget: float) -> None:
        """Stop accepting; close idle connections; let answers under way finish, for `budget` s."""
        server.stop()
        deadline = time.monotonic() + budget
        for conn in list(self.connections):
            conn.closing = True
        say_at = time.monotonic() + DRAIN_SAY_S
        while (self.connections or server.handing) and (now := time.monotonic()) < deadline:
            for conn in list(self.connections):
                conn.closing = True  # one accepted just before the drain began, too
                if conn.idle() and now - conn.idle_since >= DRAIN_IDLE_S:
                    conn.close()
            if now >= say_at:
                say_at = now + DRAIN_SAY_S
                answering = sum(not conn.idle() for conn in self.connections)
                log.info("draining: %d connection(s) open, %d of them answering; %.0f s left",
                         len(self.connections), answering, deadline - now)
            await asyncio.sleep(DRAIN_POLL_S)

    async def _send_stats(self) -> None:
        stats_at = time.monotonic()
        while True:
            asleep = time.monotonic()
            await asyncio.sleep(STALLS_EVERY_S)
            # how late the loop woke us: a worker whose loop is saturated makes every request wait this long
            self.stats.lagged(time.monotonic() - asleep - STALLS_EVERY_S)
            if time.monotonic() - stats_at >= STATS_INTERVAL_S:
                stats_at = time.monotonic()
                self._send_stats_now()
            self._report_stalls()

    def _report_stalls(self) -> None:
        """A ready rank that holds requests and sends nothing back: the supervisor judges it (said
        once a second per rank while it lasts; the supervisor ignores repeats). Its streams stay:
        a rank busy with a long prefill is quiet too. Once the supervisor sees its engine do
        nothing, it tells the workers to hand them off (router_workers/workers.py)."""
        now = time.monotonic()
        for rank, (quiet, held) in self.router.stalled(now).items():
            ready = self.router.ready.get(rank)
            if ready is not None and now - self._stall_said.get(rank, 0.0) >= STALL_REPEAT_S:
                self._stall_said[rank] = now
                self._send(protocol.stalled_message(rank, ready[1], quiet, held))

    def _send_stats_now(self) -> None:
        self.stats.chunks = sum(a.chunks for a in self.router.activity.values())
        policy = self.router.policy.report()
        self._send(protocol.stats_message(self.stats.report(self.router.load.inflight, policy.get("placed"),
                                                            policy.get("cache"))))

    def _load(self) -> None:
        """Which view this worker routes by, and what it has in flight per rank."""
        stalled = sorted(self.router.stalled(time.monotonic()))
        self._send(protocol.load_message(self._view_version, self.router.load.inflight, stalled))

    def _unreachable(self, rank: int, attempt: int, why: str) -> None:
        now = time.monotonic()
        if now - self._reported.get(rank, 0.0) < 0.1:
            return  # one report per rank per 100 ms is enough to wake its probe
        self._reported[rank] = now
        self._send(protocol.unreachable_message(rank, attempt, why))

    def _resumed(self, from_rank: int, to_rank: int, tokens: int, gap_s: float) -> None:
        self._send(protocol.resumed_message(from_rank, to_rank, tokens, gap_s))

    def _rejected(self, status: int) -> None:
        self.stats.rejected[str(status)] += 1

    def _send(self, message: bytes) -> None:
        if not self._writer.is_closing():
            self._writer.write(message)


def _tracing(settings: RouterSettings) -> Tracing | None:
    """The request spans, loaded only under --otlp-traces-endpoint (OpenTelemetry's SDK)."""
    if settings.otlp_traces_endpoint is None:
        return None
    from vllm_dp_supervisor.router.tracing import Tracing
    return Tracing.to_collector(settings.otlp_traces_endpoint, os.environ)


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
    return parser.parse_args(argv)


async def serve(listen: socket.socket, chan: socket.socket) -> None:
    """Read the settings the supervisor sends first, then serve."""
    reader, writer = await asyncio.open_unix_connection(sock=chan, limit=protocol.MAX_LINE)
    messages = protocol.read(reader)
    first = await anext(messages, None)
    if first is None:
        return  # the supervisor went away before it said anything
    await Worker(protocol.read_settings(first), listen, writer).run(messages)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("vllm_dp_supervisor.router").setLevel(logging.INFO)  # what it says once, e.g. a tokenizer
    # The terminal's ^C and the pod's SIGTERM are for the supervisor, which drains us in order.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    listen = socket.socket(fileno=args.listen_fd)
    listen.setblocking(False)
    chan = socket.socket(fileno=args.channel_fd)
    try:
        import uvloop
    except ImportError:  # not on this platform: the stock loop works, a little slower
        asyncio.run(serve(listen, chan))
    else:
        uvloop.run(serve(listen, chan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
