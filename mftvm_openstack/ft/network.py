"""Output commit: the guest's packets leave only once their epoch commits.

A ``filter-redirector`` on the guest's netdev (queue ``rx``: what the
guest sends) hands every outgoing frame to this module over a unix
socket, as a 4-byte big-endian length and the frame. We hold each frame,
tagged with the epoch it was sent in, and write it back to the filter's
second socket — from where it continues to the network — only after the
secondary acknowledged that epoch. A failover can therefore never take
back anything a client has seen (Remus semantics).

Example::

    out = OutputBuffer(paths.netout, paths.netin)
    await out.attach(monitor)      # QEMU connects, filter installed
    out.seal(epoch)                # inside the pause of checkpoint `epoch`
    await out.release(epoch)       # once `epoch` is acked
    await out.detach(monitor)      # unprotected: release all, remove filter

What is held is counted (``held``, ``held_bytes``); ``on_held(bytes)``,
if set, hears the count each time a frame is held, so that whoever owns
the guest can pause it before the buffer grows past its bound (frames
are never dropped nor let out early here).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import struct
from collections.abc import Callable
from typing import Optional

from mftvm_openstack.ft.monitor import Monitor

LOG = logging.getLogger(__name__)
_LEN = struct.Struct('!I')
#: A frame longer than this is garbage on the socket, not a packet.
MAX_FRAME = 1 << 17


class OutputBuffer:
    """Holds guest frames per epoch; releases them on commit."""

    def __init__(self, out_path: str, in_path: str,
                 netdev: str = 'n0', index: int = 0) -> None:
        self.out_path = out_path   # QEMU → us (filter outdev)
        self.in_path = in_path     # us → QEMU (filter indev)
        self.netdev = netdev
        # QEMU's ids of the filter and its chardevs (the first NIC's
        # keep their names)
        suffix = str(index) if index else ''
        self.filter_id = f'oc{index}'
        self.chardevs = (f'oc-out{suffix}', f'oc-in{suffix}')
        # epoch the frames read from now on belong to
        self._open_epoch = 1
        self._held: collections.deque[tuple[int, bytes]] = collections.deque()
        self._held_bytes = 0
        #: told the held byte count after each frame held
        self.on_held: Optional[Callable[[int], None]] = None
        self._holding = True
        self._out: Optional[asyncio.StreamReader] = None
        self._out_writer: Optional[asyncio.StreamWriter] = None
        self._in: Optional[asyncio.StreamWriter] = None
        self._connected = asyncio.Event()
        self._servers: list[asyncio.AbstractServer] = []
        self._pump: Optional[asyncio.Task[None]] = None
        self.frames_released = 0
        #: set while the open epoch holds a frame: somebody may be
        #: waiting for it, so the epoch should end soon (PrimaryPair)
        self.waiting = asyncio.Event()

    @property
    def held(self) -> int:
        return len(self._held)

    @property
    def held_bytes(self) -> int:
        """Bytes of the frames held now."""
        return self._held_bytes

    @property
    def oldest_epoch(self) -> Optional[int]:
        """The epoch of the oldest frame held (None: none held)."""
        return self._held[0][0] if self._held else None

    async def attach(self, monitor: Monitor, first_epoch: int = 1) -> None:
        """Listen, let QEMU connect, and install the filter."""
        self._open_epoch = first_epoch
        out_ready = asyncio.Event()
        in_ready = asyncio.Event()

        async def on_out(reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
            self._out = reader
            self._out_writer = writer  # closed by close()
            out_ready.set()

        async def on_in(reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
            self._in = writer
            in_ready.set()

        for path in (self.out_path, self.in_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._servers = [
            await asyncio.start_unix_server(on_out, self.out_path),
            await asyncio.start_unix_server(on_in, self.in_path)]
        for chardev, path in zip(self.chardevs,
                                 (self.out_path, self.in_path)):
            await monitor.execute('chardev-add', id=chardev, backend={
                'type': 'socket', 'data': {
                    'addr': {'type': 'unix', 'data': {'path': path}},
                    'server': False}})
        await asyncio.wait_for(
            asyncio.gather(out_ready.wait(), in_ready.wait()), 10)
        await monitor.execute(
            'object-add', **{'qom-type': 'filter-redirector',
                             'id': self.filter_id,
                             'netdev': self.netdev, 'queue': 'rx',
                             'outdev': self.chardevs[0],
                             'indev': self.chardevs[1]})
        self._pump = asyncio.create_task(self._read_frames())

    async def _read_frames(self) -> None:
        assert self._out is not None
        try:
            while True:
                (length,) = _LEN.unpack(await self._out.readexactly(4))
                if length > MAX_FRAME:
                    LOG.error('filter sent a %d-byte frame; output commit '
                              'stream is corrupt', length)
                    return
                frame = await self._out.readexactly(length)
                if self._holding:
                    self._held.append((self._open_epoch, frame))
                    self._held_bytes += len(frame)
                    self.waiting.set()
                    if self.on_held is not None:
                        self.on_held(self._held_bytes)
                else:
                    self._write(frame)
                    await self._drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            # A filter-redirector whose outdev is gone lets packets
            # through unheld: worth a word in the log.
            if self._holding:
                LOG.warning('output commit: QEMU closed the filter socket')
        except Exception:
            LOG.exception('output commit: reading guest frames failed')
            raise

    def _write(self, frame: bytes) -> None:
        if self._in is not None and not self._in.is_closing():
            self._in.write(_LEN.pack(len(frame)) + frame)
            self.frames_released += 1

    async def _drain(self) -> None:
        if self._in is not None and not self._in.is_closing():
            with contextlib.suppress(ConnectionError):
                await self._in.drain()

    def seal(self, epoch: int) -> None:
        """Checkpoint ``epoch`` is being taken: later frames belong to the
        next epoch. Frames still in the socket are tagged later, which only
        holds them longer (safe)."""
        self._open_epoch = epoch + 1
        self.waiting.clear()

    async def release(self, epoch: int) -> None:
        """Send every frame of epochs ≤ ``epoch`` on to the network."""
        while self._held and self._held[0][0] <= epoch:
            self._write(self._pop())
        await self._drain()

    def _pop(self) -> bytes:
        frame = self._held.popleft()[1]
        self._held_bytes -= len(frame)
        return frame

    async def passthrough(self) -> None:
        """Stop holding: release everything now and forward from now on."""
        self._holding = False
        while self._held:
            self._write(self._pop())
        await self._drain()

    async def detach(self, monitor: Monitor) -> None:
        """Unprotected for good: flush, then take the filter out of the
        packet path so the guest's network no longer depends on us."""
        await self.passthrough()
        with contextlib.suppress(Exception):
            await monitor.execute('object-del', id=self.filter_id)
            for chardev in self.chardevs:
                await monitor.execute('chardev-remove', id=chardev)
        await self.close()

    def discard(self) -> None:
        """Drop held frames (the guest they came from is gone)."""
        self._held.clear()
        self._held_bytes = 0

    async def close(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        for server in self._servers:
            server.close()
        for writer in (self._in, self._out_writer):
            if writer is not None:
                writer.close()
        for path in (self.out_path, self.in_path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


class OutputBuffers:
    """The output buffers of every NIC of a guest, as one
    (:class:`~mftvm_openstack.ft.pair.interfaces.OutputBuffer`): each
    NIC's frames are held, and released in their order, once their epoch
    commits; ``waiting`` is set while any NIC holds a frame of the open
    epoch. A guest with one NIC has one buffer in it::

        out = OutputBuffers([OutputBuffer(o0, i0, 'n0'),
                             OutputBuffer(o1, i1, 'n1', index=1)])
        await out.attach(monitor)
    """

    def __init__(self, buffers: list[OutputBuffer]) -> None:
        if not buffers:
            raise ValueError('a guest with no NIC has no output to hold')
        self.buffers = buffers
        self.waiting = asyncio.Event()
        self._on_held: Optional[Callable[[int], None]] = None
        for buf in buffers:
            buf.waiting = self.waiting

    @property
    def on_held(self) -> Optional[Callable[[int], None]]:
        return self._on_held

    @on_held.setter
    def on_held(self, callback: Optional[Callable[[int], None]]) -> None:
        # The bound is on what every NIC holds together.
        self._on_held = callback
        for buf in self.buffers:
            buf.on_held = None if callback is None else self._held_one

    def _held_one(self, _bytes: int) -> None:
        if self._on_held is not None:
            self._on_held(self.held_bytes)

    @property
    def held(self) -> int:
        return sum(b.held for b in self.buffers)

    @property
    def held_bytes(self) -> int:
        return sum(b.held_bytes for b in self.buffers)

    @property
    def frames_released(self) -> int:
        return sum(b.frames_released for b in self.buffers)

    @property
    def oldest_epoch(self) -> Optional[int]:
        """The epoch of the oldest frame any NIC holds (None: none)."""
        held = [e for e in (b.oldest_epoch for b in self.buffers)
                if e is not None]
        return min(held) if held else None

    async def attach(self, monitor: Monitor, first_epoch: int = 1) -> None:
        attached: list[OutputBuffer] = []
        try:
            for buf in self.buffers:
                await buf.attach(monitor, first_epoch)
                attached.append(buf)
        except BaseException:
            for buf in attached:
                with contextlib.suppress(Exception):
                    await buf.detach(monitor)
            raise

    def seal(self, epoch: int) -> None:
        for buf in self.buffers:
            buf.seal(epoch)

    async def release(self, epoch: int) -> None:
        for buf in self.buffers:
            await buf.release(epoch)

    async def passthrough(self) -> None:
        for buf in self.buffers:
            await buf.passthrough()

    async def detach(self, monitor: Monitor) -> None:
        for buf in self.buffers:
            await buf.detach(monitor)

    def discard(self) -> None:
        for buf in self.buffers:
            buf.discard()

    async def close(self) -> None:
        for buf in self.buffers:
            await buf.close()
