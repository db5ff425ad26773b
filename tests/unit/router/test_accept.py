"""router/accept.py over a real listening socket, in process: a burst is taken a bounded batch at a
time until none waits; a socket shut down (the drain) stops it; nothing blocks."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import ClassVar

from vllm_dp_supervisor.router import accept
from vllm_dp_supervisor.router.accept import Acceptor


class Counted(asyncio.Protocol):
    made: ClassVar[list[asyncio.BaseTransport]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Counted.made.append(transport)


async def until(condition, what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.005)


def test_a_burst_is_accepted_in_bounded_batches_and_a_shut_socket_stops_it(monkeypatch):
    monkeypatch.setattr(accept, "ACCEPT_BATCH", 8)
    Counted.made = []

    async def main() -> None:
        listen = socket.socket()
        listen.bind(("127.0.0.1", 0))
        listen.setblocking(False)
        acceptor = Acceptor(listen, Counted, 512)
        acceptor.start()
        clients = [socket.create_connection(listen.getsockname()) for _ in range(100)]
        turns = 0
        while len(Counted.made) < 100:
            turns += 1
            await asyncio.sleep(0)
            assert turns < 10_000
        assert turns >= 100 // 8  # at most a batch a turn
        listen.shutdown(socket.SHUT_RDWR)  # the supervisor's drain: accept now fails with EINVAL
        await until(lambda: acceptor._loop is None, "the acceptor to stop on the shut socket")
        for c in clients:
            c.close()
        for t in Counted.made:
            t.close()
        listen.close()

    asyncio.run(main())
