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
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Optional

from mftvm_openstack.contract.control import ControlReply, ControlRequest
from mftvm_openstack.contract.record import ContractError

LOG = logging.getLogger(__name__)

#: how long a client may take to send its request
READ_TIMEOUT = 5.0
#: the longest request line read (requests are a few hundred bytes)
MAX_LINE = 1 << 16

Handler = Callable[[ControlRequest], Awaitable[ControlReply]]


class ControlServer:

    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._server: Optional[asyncio.AbstractServer] = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._server = await asyncio.start_unix_server(
            self._serve, self.path, limit=MAX_LINE)

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

    async def _serve(self, reader: asyncio.StreamReader,
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
