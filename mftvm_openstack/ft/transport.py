"""The data plane: one framed stream from the primary to the secondary.

Checkpoints are large and frequent, so they travel on a direct stream
(TCP, or a unix socket on one machine), not on a message bus. Every frame
is a fixed header plus a payload::

    magic 'MFTV' | kind (1 byte) | 3 pad | epoch (u64) | length (u64)

All integers are big-endian. Example::

    chan = await Channel.connect(DataAddress.parse('unix:/run/x.sock'))
    await chan.send(Kind.MARK, epoch=7)
    msg = await chan.recv()            # Message(kind=Kind.MARKED, epoch=7)

A CHECKPOINT payload is: device-state length (u64), page count (u64),
device state, page numbers (u32 little-endian), pages (4 KiB each).

With an :class:`ssl.SSLContext` on both ends the stream is mutual TLS
(see :mod:`mftvm_openstack.ft.pair_tls` for a pair's contexts): the
server completes the handshake and checks the peer before its
``on_connect`` ever sees the connection, so whoever fails either is
closed and logged, and counts for nothing::

    server = await serve(addr, on_connect, tls=ServerTls(
        context, check_peer=lambda cert: None if ok(cert) else 'why'))
    chan = await Channel.connect(addr, tls=ClientTls(ctx, 'peer-name'))

Strangers cannot crowd the real peer out: a handshake must end within
``ServerTls.handshake_timeout``, and at most ``max_handshakes``
connections may be unauthenticated at once, ``max_handshakes_per_peer``
of them from one address (see :class:`HandshakeGate`); any more are
closed as they arrive. A flood from one address leaves room for the
peer, and nothing grows with the flood.

A frame that has begun must keep arriving: with ``stall_timeout`` set, a
payload from which no byte arrives for that long breaks the stream
(ConnectionError), so a peer frozen mid-frame (a stopped process, a host
that lost power) is lost like one that closed the stream. On TCP the same
bound becomes the socket's keepalive and ``TCP_USER_TIMEOUT`` (see
:func:`tune_tcp`)::

    chan = await Channel.connect(addr, stall_timeout=1.0)
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import logging
import math
import re
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Optional

import numpy as np

from mftvm_openstack.ft.trackers import PAGE_SIZE, RamDelta

LOG = logging.getLogger(__name__)

MAGIC = b'MFTV'
#: how long a TLS handshake may take before the connection is dropped
#: (a peer that connects and says nothing must not linger)
HANDSHAKE_TIMEOUT = 10.0
#: the most connections that may be in their TLS handshake at once (a
#: pair has one real peer; the rest of the room is for its reconnects)
MAX_HANDSHAKES = 32
#: ... and from one address, so one stranger cannot take all the room
MAX_HANDSHAKES_PER_PEER = 4
HEADER = struct.Struct('!4sB3xQQ')
#: A checkpoint can carry all of a large guest's RAM; refuse anything
#: bigger than this as a corrupt or hostile frame.
MAX_PAYLOAD = 1 << 40
_CKPT = struct.Struct('!QQ')
#: keepalive probes sent before a silent TCP peer counts as gone
KEEPALIVE_PROBES = 3
#: a stall timer that fires as a starved process wakes up is re-checked
#: this long before the stall counts (the bytes may be here already)
STALL_RECHECK_S = 0.05


class Kind(enum.IntEnum):
    HELLO = 1         # primary → secondary: contract.hello.Hello (JSON)
    READY = 2         # secondary → primary: contract.hello.Ready (JSON)
    MARK = 3          # disk epoch boundary, sent inside the pause
    MARKED = 4
    CHECKPOINT = 5    # device state + RAM delta of one epoch
    ACK = 6           # the epoch is committed on the secondary
    HEARTBEAT = 7     # primary → secondary; epoch field: a sequence no.
    PRIMARY_LOST = 8  # the primary's guest is gone: take over now
    ERROR = 9         # JSON {"error": "..."}
    BYE = 10          # orderly end of protection
    ECHO = 11         # secondary → primary: heartbeat n heard; payload:
                      # its detection time in ms (ASCII)
    BOOT_FILE = 12    # primary → secondary, after HELLO: the bytes of
                      # the HELLO's boot_files[epoch] (ft.boot_files)


def _kind_name(kind: int) -> str:
    try:
        return Kind(kind).name
    except ValueError:
        return f'kind {kind}'


class ProtocolError(Exception):
    """The peer sent something that is not a valid frame."""


class AuthenticationError(Exception):
    """The peer is not who the pair's credentials say it must be."""


@dataclasses.dataclass
class Message:
    kind: Kind
    epoch: int
    payload: bytes = b''

    def json(self) -> Any:
        try:
            return json.loads(self.payload)
        except ValueError:
            raise ProtocolError(f'{self.kind.name} payload is not JSON') \
                from None


#: a socket path (relative to a relative --state-dir too), at most the
#: kernel's 107 bytes
_UNIX_PATH = re.compile(r'[^\x00-\x1f\x7f]{1,107}')
_HOST = re.compile(r'[A-Za-z0-9_.:\[\]-]{1,255}')
_PORT = re.compile(r'[0-9]{1,5}')


@dataclasses.dataclass(frozen=True)
class DataAddress:
    """Where a secondary listens: ``unix:/path`` or ``tcp:host:port``."""

    path: Optional[str] = None
    host: Optional[str] = None
    port: Optional[int] = None

    @classmethod
    def parse(cls, text: str) -> DataAddress:
        # From a control request or an agent's answer: only a socket
        # path, or a host name / IP literal and a port number.
        if text.startswith('unix:') and _UNIX_PATH.fullmatch(text[5:]):
            return cls(path=text[5:])
        if text.startswith('tcp:'):
            host, _, port = text[4:].rpartition(':')
            if _HOST.fullmatch(host) and _PORT.fullmatch(port) and \
                    int(port) <= 65535:
                return cls(host=host, port=int(port))
        raise ValueError(f'bad data-plane address {text!r}: use unix:PATH '
                         f'or tcp:HOST:PORT')

    def __str__(self) -> str:
        if self.path is not None:
            return f'unix:{self.path}'
        return f'tcp:{self.host}:{self.port}'


def encode_checkpoint(devstate: bytes, delta: RamDelta) -> list[Any]:
    """The buffers of a CHECKPOINT payload (no copy of the pages)."""
    return [_CKPT.pack(len(devstate), len(delta.indices)), devstate,
            delta.indices.astype('<u4').tobytes(),
            memoryview(delta.pages)]  # type: ignore[arg-type]


def decode_checkpoint(payload: bytes) -> tuple[bytes, RamDelta]:
    if len(payload) < _CKPT.size:
        raise ProtocolError('short CHECKPOINT payload')
    dev_len, npages = _CKPT.unpack_from(payload)
    expected = _CKPT.size + dev_len + npages * (4 + PAGE_SIZE)
    if len(payload) != expected:
        raise ProtocolError(f'CHECKPOINT payload is {len(payload)} bytes, '
                            f'header says {expected}')
    off = _CKPT.size
    devstate = payload[off:off + dev_len]
    off += dev_len
    indices = np.frombuffer(payload, '<u4', npages, off)
    off += npages * 4
    pages = np.frombuffer(payload, np.uint8, npages * PAGE_SIZE, off)
    return devstate, RamDelta(indices, pages.reshape(-1, PAGE_SIZE))


def _flat(buffer: Any) -> memoryview:
    """A 1-D byte view of ``buffer`` (an empty one for an empty array)."""
    view = memoryview(buffer)
    return view.cast('B') if view.nbytes else memoryview(b'')


@dataclasses.dataclass(frozen=True)
class ClientTls:
    """TLS for :meth:`Channel.connect`: the context and the name the
    server's certificate must carry."""

    context: ssl.SSLContext
    server_name: str


@dataclasses.dataclass(frozen=True)
class ServerTls:
    """TLS for :func:`serve`: the context (which requires a client
    certificate) and ``check_peer(peercert)``, the reason to refuse a
    verified certificate all the same, or None to accept it; and the
    bounds on connections that have not authenticated yet."""

    context: ssl.SSLContext
    check_peer: Callable[[dict[str, Any]], Optional[str]]
    handshake_timeout: float = HANDSHAKE_TIMEOUT
    max_handshakes: int = MAX_HANDSHAKES
    max_handshakes_per_peer: int = MAX_HANDSHAKES_PER_PEER


class HandshakeGate:
    """Admission of connections that have not authenticated yet: at most
    ``total`` at once, at most ``per_peer`` from one address (a unix
    socket's peers have none: only ``total`` bounds them)::

        gate = HandshakeGate(total=32, per_peer=4)
        why = gate.enter('10.0.0.9')      # None: admitted; else why not
        ...                               # the handshake
        gate.leave('10.0.0.9')
    """

    def __init__(self, total: int, per_peer: int) -> None:
        self.total = total
        self.per_peer = per_peer
        self.pending = 0
        #: connections refused since the gate was made
        self.refused = 0
        self._by_peer: dict[str, int] = {}

    def enter(self, address: Optional[str]) -> Optional[str]:
        """Admit a connection from ``address`` (None: why not)."""
        if self.pending >= self.total:
            why = f'{self.pending} connections are in their handshake'
        elif address is not None and \
                self._by_peer.get(address, 0) >= self.per_peer:
            why = (f'{self.per_peer} connections from {address} are in '
                   f'their handshake')
        else:
            self.pending += 1
            if address is not None:
                self._by_peer[address] = self._by_peer.get(address, 0) + 1
            return None
        self.refused += 1
        return why

    def leave(self, address: Optional[str]) -> None:
        """A connection :meth:`enter` admitted is done authenticating."""
        self.pending -= 1
        if address is not None:
            left = self._by_peer.pop(address) - 1
            if left:
                self._by_peer[address] = left


def tune_tcp(sock: Optional[socket.socket], stall_timeout: float) -> None:
    """Make the kernel notice a dead TCP peer within about
    ``stall_timeout`` seconds (a unix socket is left alone).

    Keepalive: idle ``stall_timeout`` and then :data:`KEEPALIVE_PROBES`
    probes a third of it apart (whole seconds, at least 1): a peer that
    vanished while we only listen (the primary waiting for ACKs) is
    noticed in about twice the stall timeout. ``TCP_USER_TIMEOUT``: data
    we sent may stay unacknowledged by the peer's kernel for at most twice
    the stall timeout (never less than 1 s), then the connection breaks
    and a blocked send fails instead of hanging.
    """
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    idle = max(1, math.ceil(stall_timeout))
    interval = max(1, math.ceil(stall_timeout / 3))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT,
                    KEEPALIVE_PROBES)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                    max(1000, round(2 * stall_timeout * 1000)))


class Channel:
    """A framed, ordered stream; one writer and one reader at a time.

    ``stall_timeout``: seconds a frame that has begun may go without a
    byte arriving before the stream counts as broken (None: no limit).
    """

    def __init__(self, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter,
                 stall_timeout: Optional[float] = None) -> None:
        self._reader = reader
        self._writer = writer
        self.stall_timeout = stall_timeout
        self.bytes_sent = 0
        # a frame's header read by wait_frame(), its payload not yet
        self._header: Optional[bytes] = None
        if stall_timeout is not None:
            tune_tcp(writer.get_extra_info('socket'), stall_timeout)

    @classmethod
    async def connect(cls, addr: DataAddress, timeout: float = 10.0,
                      tls: Optional[ClientTls] = None,
                      stall_timeout: Optional[float] = None) -> Channel:
        kwargs: dict[str, Any] = {'limit': 1 << 20}
        if tls is not None:
            kwargs.update(ssl=tls.context, server_hostname=tls.server_name,
                          ssl_handshake_timeout=timeout)
        if addr.path is not None:
            coro = asyncio.open_unix_connection(addr.path, **kwargs)
        else:
            coro = asyncio.open_connection(addr.host, addr.port, **kwargs)
        try:
            reader, writer = await asyncio.wait_for(coro, timeout)
        except ssl.SSLError as exc:
            # not a reachability problem: retrying will not help
            raise AuthenticationError(
                f'the secondary at {addr} failed authentication: '
                f'{exc.reason or exc}') from None
        except (TimeoutError, OSError) as exc:
            raise ConnectionError(
                f'cannot reach the secondary at {addr}: '
                f'{exc or "timed out"}') from None
        return cls(reader, writer, stall_timeout)

    async def send(self, kind: Kind, epoch: int = 0,
                   *buffers: Any) -> None:
        # Flat byte views: the transport slices what a partial send left
        # over, and slicing a 2-D view (a page array) cuts whole rows.
        views = [_flat(b) for b in buffers]
        length = sum(v.nbytes for v in views)
        self._writer.write(HEADER.pack(MAGIC, kind, epoch, length))
        for view in views:
            self._writer.write(view)
        self.bytes_sent += HEADER.size + length
        await self._writer.drain()

    async def send_json(self, kind: Kind, data: Any, epoch: int = 0) -> None:
        await self.send(kind, epoch, json.dumps(data).encode())

    async def wait_frame(self) -> None:
        """Until the next frame has begun to arrive (its header is here).

        Safe to cancel, so a caller may bound it with any clock's
        timeout: a cancelled wait consumes nothing. Silence is measured
        this way; a big checkpoint may take long to arrive once begun."""
        if self._header is None:
            try:
                self._header = await self._reader.readexactly(HEADER.size)
            except asyncio.IncompleteReadError:
                raise ConnectionError('the peer closed the data stream') \
                    from None

    async def recv(self, timeout: Optional[float] = None, *,
                   limit: int = MAX_PAYLOAD) -> Message:
        """The next frame; ``timeout`` bounds the wait for its header (see
        :meth:`wait_frame`), ``stall_timeout`` each wait for more of its
        payload. A frame longer than ``limit`` is refused unread."""
        await asyncio.wait_for(self.wait_frame(), timeout)
        header, self._header = self._header, None
        assert header is not None
        magic, kind, epoch, length = HEADER.unpack(header)
        if magic != MAGIC:
            raise ProtocolError(f'bad frame magic {magic!r}')
        if length > min(limit, MAX_PAYLOAD):
            raise ProtocolError(f'{_kind_name(kind)} frame of {length} '
                                f'bytes is too large (at most '
                                f'{min(limit, MAX_PAYLOAD)} here)')
        try:
            kind = Kind(kind)
        except ValueError:
            raise ProtocolError(f'unknown frame kind {kind}') from None
        if self.stall_timeout is None:
            try:
                payload = await self._reader.readexactly(length)
            except asyncio.IncompleteReadError:
                raise ConnectionError('the data stream broke mid-frame') \
                    from None
        else:
            payload = await self._read_progressing(length,
                                                   self.stall_timeout)
        return Message(kind, epoch, payload)

    async def _read_progressing(self, length: int, stall: float) -> bytes:
        """``length`` bytes, each piece arriving within ``stall`` s."""
        parts = []
        left = length
        while left:
            try:
                part = await self._read_some(left, stall)
            except TimeoutError:
                raise ConnectionError(
                    f'the data stream stalled mid-frame: no byte for '
                    f'{stall}s with {left} of {length} bytes to come') \
                    from None
            if not part:
                raise ConnectionError('the data stream broke mid-frame')
            parts.append(part)
            left -= len(part)
        return b''.join(parts)

    async def _read_some(self, most: int, stall: float) -> bytes:
        try:
            async with asyncio.timeout(stall):
                return await self._reader.read(most)
        except TimeoutError:
            # When this process was starved of CPU for longer than the
            # timeout, the timer fires before the bytes that arrived
            # meanwhile are read: bytes ready now are no stall.
            async with asyncio.timeout(STALL_RECHECK_S):
                return await self._reader.read(most)

    def close(self) -> None:
        try:
            self._writer.close()
        except Exception:  # the transport may already be gone
            pass


async def _authenticate(writer: asyncio.StreamWriter,
                        tls: ServerTls) -> Optional[str]:
    """Why the peer of ``writer`` is refused (None: it is accepted)."""
    try:
        # asyncio's own handshake timeout would say "connection aborted"
        async with asyncio.timeout(tls.handshake_timeout):
            await writer.start_tls(tls.context)
    except ssl.SSLError as exc:
        return f'TLS handshake failed: {exc.reason or exc}'
    except TimeoutError:
        return f'TLS handshake timed out ({tls.handshake_timeout}s)'
    except (ConnectionError, OSError) as exc:
        return f'TLS handshake broke off: {str(exc) or type(exc).__name__}'
    cert = writer.get_extra_info('peercert')
    if not cert:
        return 'no client certificate'
    return tls.check_peer(cert)


def _peer(writer: asyncio.StreamWriter) -> tuple[str, Optional[str]]:
    """The peer of ``writer`` as a log shows it, and its address (None
    for a unix socket's)."""
    peer = writer.get_extra_info('peername')
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f'{peer[0]}:{peer[1]}', str(peer[0])
    return str(peer or 'a local peer'), None


#: while a flood is refused, one WARNING for this many refusals
REFUSALS_PER_WARNING = 100


async def serve(addr: DataAddress,
                on_connect: Callable[[Channel], Awaitable[None]],
                tls: Optional[ServerTls] = None,
                stall_timeout: Optional[float] = None) \
        -> asyncio.AbstractServer:
    """Listen on ``addr``; ``on_connect(channel)`` runs per connection
    (each channel with ``stall_timeout``).

    With ``tls``, only for a peer that completed the handshake and
    passed ``tls.check_peer``; any other is closed with one WARNING.
    A connection beyond the gate's bounds (:class:`ServerTls`) is closed
    at once, without a handshake; a flood of them is logged every
    :data:`REFUSALS_PER_WARNING` connections."""
    gate = None if tls is None else HandshakeGate(
        tls.max_handshakes, tls.max_handshakes_per_peer)

    async def handle(reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        if tls is not None and gate is not None:
            peer, address = _peer(writer)
            why = gate.enter(address)
            if why is not None:
                if (gate.refused - 1) % REFUSALS_PER_WARNING == 0:
                    LOG.warning('refused a data connection from %s: %s '
                                '(%d refused so far)', peer, why,
                                gate.refused)
                writer.close()
                return
            try:
                why = await _authenticate(writer, tls)
            finally:
                gate.leave(address)
            if why is not None:
                LOG.warning('refused a data connection from %s: %s',
                            peer, why)
                writer.close()
                return
        await on_connect(Channel(reader, writer, stall_timeout))

    if addr.path is not None:
        return await asyncio.start_unix_server(handle, addr.path,
                                               limit=1 << 20)
    return await asyncio.start_server(handle, addr.host, addr.port,
                                      limit=1 << 20)
