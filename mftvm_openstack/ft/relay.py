"""An NBD relay that cuts a replica connection which stopped answering.

QEMU 7.2's NBD client has no I/O timeout. When the secondary's export
stops answering — its host froze, or the network dropped it without a
reset — a write-blocking mirror waits for ever, and so does the next
``stop`` (it flushes every node, the replica included). The primary's
guest would freeze at its next checkpoint, protected by nothing.

So QEMU does not talk to the export directly: it talks to this relay on
a unix socket, and the relay forwards both ways. When the export has
been sent something and has answered nothing for ``stall_timeout``
seconds, the relay closes both sides. QEMU then sees the connection end,
its replica requests fail at once (``reconnect-delay`` 0), the mirror job
fails, and the pair carries on unprotected — its usual reaction to a lost
secondary::

    relay = NbdRelay(upstream=NbdTarget(host='10.0.0.12', port=10809),
                     path='/run/mftvm/vm0/nbd-relay.sock',
                     stall_timeout=3.0,
                     on_cut=lambda why: log.warning(why))
    local = await relay.start()      # an NbdTarget on the unix socket
    ...                              # blockdev-add nbd at ``local``
    await relay.close()

NBD replies are prompt (a write is acknowledged once written): silence
while a request is outstanding means the peer is gone, not busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Optional, Protocol

from mftvm_openstack.ft.disk import NbdTarget

LOG = logging.getLogger(__name__)

CHUNK = 1 << 18


class Timer(Protocol):
    """What ``loop.call_later`` returns: a call that can be called off."""

    def cancel(self) -> None: ...


#: ``loop.call_later``'s shape: (delay in s, callback) -> Timer
CallLater = Callable[[float, Callable[[], None]], Timer]


class _Link:
    """One QEMU connection and its upstream twin.

    A stall timer runs from the first request the export has not answered
    yet; any answer stops it (what is still outstanding gets a fresh
    allowance with the next request), and if it fires the link is cut.
    """

    def __init__(self, relay: NbdRelay, down_r: asyncio.StreamReader,
                 down_w: asyncio.StreamWriter,
                 up_r: asyncio.StreamReader,
                 up_w: asyncio.StreamWriter) -> None:
        self.relay = relay
        self.writers = (down_w, up_w)
        self._stall: Optional[Timer] = None
        self._call_later: CallLater = (
            relay.call_later or asyncio.get_running_loop().call_later)
        self.tasks = [
            asyncio.ensure_future(self._pump(down_r, up_w, upstream=True)),
            asyncio.ensure_future(self._pump(up_r, down_w, upstream=False)),
        ]

    async def _pump(self, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, upstream: bool) -> None:
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if upstream:
                    if self._stall is None:
                        self._stall = self._call_later(
                            self.relay.stall_timeout, self._stalled)
                elif self._stall is not None:
                    # The export answers: no stall.
                    self._stall.cancel()
                    self._stall = None
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self.close()

    def _stalled(self) -> None:
        self._stall = None
        self.relay._cut(f'the disk replica at {self.relay.upstream_name} '
                        f'did not answer for {self.relay.stall_timeout:.1f}s')
        self.close()

    def close(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        for writer in self.writers:
            with contextlib.suppress(Exception):
                writer.close()
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()
        self.relay._links.discard(self)


class NbdRelay:
    """A local NBD endpoint in front of ``upstream``; see the module."""

    def __init__(self, upstream: NbdTarget, path: str,
                 stall_timeout: float = 3.0,
                 on_cut: Optional[Callable[[str], None]] = None,
                 call_later: Optional[CallLater] = None) -> None:
        self.upstream = upstream
        #: arms the stall timers (None: the running loop's call_later)
        self.call_later = call_later
        self.upstream_name = upstream.uri()
        self.path = path
        self.stall_timeout = stall_timeout
        self.on_cut = on_cut
        self.cut_reason: Optional[str] = None
        self._links: set[_Link] = set()
        self._server: Optional[asyncio.AbstractServer] = None

    async def start(self) -> NbdTarget:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(self._accept,
                                                       self.path)
        return NbdTarget(socket=self.path, export=self.upstream.export)

    async def _open_upstream(self) -> tuple[asyncio.StreamReader,
                                            asyncio.StreamWriter]:
        up = self.upstream
        if up.socket is not None:
            coro = asyncio.open_unix_connection(up.socket)
        else:
            coro = asyncio.open_connection(up.host, up.port)
        return await asyncio.wait_for(coro, self.stall_timeout)

    async def _accept(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        if self.cut_reason is not None:
            writer.close()      # once cut, the replica stays given up
            return
        try:
            up_r, up_w = await self._open_upstream()
        except (OSError, TimeoutError) as exc:
            LOG.warning('cannot reach the disk replica at %s: %s',
                        self.upstream_name, exc or 'timed out')
            writer.close()
            return
        self._links.add(_Link(self, reader, writer, up_r, up_w))

    def _cut(self, reason: str) -> None:
        if self.cut_reason is None:
            self.cut_reason = reason
            LOG.error('%s: cutting it off', reason)
            if self.on_cut is not None:
                self.on_cut(reason)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
