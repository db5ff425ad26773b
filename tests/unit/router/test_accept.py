"""router/accept.py over a real listening socket, in process: a burst is taken a bounded batch at a
time until none waits; a socket shut down (the drain) stops it; nothing blocks."""

from __future__ import annotations

import asyncio
import errno
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


def test_out_of_descriptors_it_stops_accepting_for_a_while_instead_of_spinning(monkeypatch):
    monkeypatch.setattr(accept, "PAUSE_S", 0.05)
    Counted.made = []

    class Full(socket.socket):
        calls = 0

        def accept(self):  # type: ignore[override]
            Full.calls += 1
            if Full.calls <= 3:
                raise OSError(errno.EMFILE, "Too many open files")
            return super().accept()

    async def main() -> None:
        listen = Full()
        listen.bind(("127.0.0.1", 0))
        listen.setblocking(False)
        acceptor = Acceptor(listen, Counted, 16)
        acceptor.start()
        client = socket.create_connection(listen.getsockname())
        for _ in range(200):  # 200 turns of the loop: spinning would call accept on every one
            await asyncio.sleep(0)
        assert Full.calls == 1
        await until(lambda: len(Counted.made) == 1, "accepted once the pause ended")
        assert Full.calls == 5  # three refused, a pause after each; then the connection, then an empty queue
        acceptor.stop()
        client.close()
        Counted.made[0].close()
        listen.close()

    asyncio.run(main())
