"""The control server: one request, one reply, on ``<role>/control.sock``.

A client writes one JSON line, a
:class:`~mftvm_openstack.contract.control.ControlRequest`, and reads one
back, a :class:`~mftvm_openstack.contract.control.ControlReply`. A
request that does not fit the contract gets ``ok: false`` and the
contract's message; a bad client never hurts the process::

    server = ControlServer(os.path.join(root, 'control.sock'), side.command)
    await server.start()
    # client: {"op": "failover"}  ->  {"ok": true, "error": "", ...}
    #         {"op": "reboot"}    ->  {"ok": false, "error": "op: must be
    #                                  one of status, failover, ...", ...}

The socket is the guest's steering wheel (failover, stop), so only root
and the process's own user may use it: the socket is 0600 in a 0700
directory, and each connection's peer credentials (``SO_PEERCRED``) are
checked as well, in case a directory's mode is ever loosened. At most
:data:`MAX_CLIENTS` connections are served at once; more are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Optional

from mftvm_openstack.contract.control import ControlReply, ControlRequest
from mftvm_openstack.contract.record import ContractError

LOG = logging.getLogger(__name__)

#: how long a client may take to send its request
READ_TIMEOUT = 5.0
#: the longest request line read (requests are a few hundred bytes)
MAX_LINE = 1 << 16
#: connections served at once (a client holds one for READ_TIMEOUT at most)
MAX_CLIENTS = 16
_UCRED = struct.Struct('3i')  # pid, uid, gid


def peer_uid(sock: socket.socket) -> int:
    """The user id of the process at the other end of a unix socket."""
    _pid, uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return uid

Handler = Callable[[ControlRequest], Awaitable[ControlReply]]


class ControlServer:

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: Optional[asyncio.AbstractServer] = None
        self._clients = 0
        #: who may steer the guest: root and this process's own user
        self.allowed_uids = frozenset({0, os.geteuid()})

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        # Bind under a umask that leaves no moment with a wider mode.
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, self.path, limit=MAX_LINE)
        finally:
            os.umask(old)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def answer(self, line: bytes) -> ControlReply:
        """The reply to one request line."""
        try:
            request = ControlRequest.from_dict(json.loads(line or b'{}'),
                                               'request')
        except (ContractError, ValueError) as exc:
            return ControlReply(ok=False, error=str(exc))
        try:
            return await self.handler(request)
        except (ContractError, ValueError) as exc:
            return ControlReply(ok=False, error=str(exc))
        except Exception as exc:
            LOG.exception('control request %s failed', request.op.value)
            return ControlReply(ok=False, error=f'internal error: {exc}')

    def _refusal(self, writer: asyncio.StreamWriter) -> Optional[str]:
        """Why this connection is not served, or None."""
        if self._clients >= MAX_CLIENTS:
            return f'more than {MAX_CLIENTS} control clients at once'
        sock = writer.get_extra_info('socket')
        try:
            uid = peer_uid(sock)
        except (OSError, struct.error, TypeError) as exc:
            return f'cannot tell who the peer is: {exc}'
        if uid not in self.allowed_uids:
            return f'peer uid {uid} may not steer this guest'
        return None

    async def _serve(self, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        refusal = self._refusal(writer)
        if refusal is not None:
            LOG.warning('%s: connection refused: %s', self.path, refusal)
            writer.close()
            return
        self._clients += 1
        try:
            await self._answer_client(reader, writer)
        finally:
            self._clients -= 1

    async def _answer_client(self, reader: asyncio.StreamReader,
                             writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            reply = await self.answer(line)
        except (TimeoutError, ValueError, ConnectionError) as exc:
            # too slow, a line over MAX_LINE, or gone
            reply = ControlReply(ok=False, error=str(exc) or 'no request')
        with contextlib.suppress(Exception):
            writer.write(json.dumps(reply.to_dict()).encode() + b'\n')
            await writer.drain()
            writer.close()
