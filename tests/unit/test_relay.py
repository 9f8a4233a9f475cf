"""The NBD relay forwards both ways and cuts a peer that stops answering."""

from __future__ import annotations

import asyncio
import os
import tempfile
import unittest

from mftvm_openstack.ft.disk import NbdTarget
from mftvm_openstack.ft.relay import NbdRelay


class RelayTest(unittest.IsolatedAsyncioTestCase):

    async def asyncSetUp(self):
        self.dir = tempfile.mkdtemp()
        self.answering = True
        self.server = await asyncio.start_unix_server(
            self._serve, os.path.join(self.dir, 'up.sock'))
        self.cuts: list[str] = []
        self.relay = NbdRelay(
            NbdTarget(socket=os.path.join(self.dir, 'up.sock')),
            os.path.join(self.dir, 'relay.sock'), stall_timeout=0.5,
            on_cut=self.cuts.append)
        self.local = await self.relay.start()

    async def asyncTearDown(self):
        await self.relay.close()
        self.server.close()

    async def _serve(self, reader, writer):
        # A stand-in export: answers each request line, unless frozen.
        while line := await reader.readline():
            if self.answering:
                writer.write(b'ok ' + line)
                await writer.drain()

    async def _connect(self):
        return await asyncio.open_unix_connection(self.local.socket)

    async def test_forwards_both_ways(self):
        reader, writer = await self._connect()
        for i in range(3):
            writer.write(b'write %d\n' % i)
            self.assertEqual(b'ok write %d\n' % i,
                             await asyncio.wait_for(reader.readline(), 2))
        # Idle (nothing outstanding) is not a stall.
        await asyncio.sleep(1.0)
        writer.write(b'again\n')
        self.assertEqual(b'ok again\n',
                         await asyncio.wait_for(reader.readline(), 2))
        self.assertEqual([], self.cuts)
        writer.close()

    async def test_silent_peer_is_cut_off(self):
        reader, writer = await self._connect()
        writer.write(b'first\n')
        await asyncio.wait_for(reader.readline(), 2)
        self.answering = False
        writer.write(b'stuck\n')
        # QEMU's side of the connection ends: its requests fail at once.
        self.assertEqual(b'', await asyncio.wait_for(reader.read(), 3))
        self.assertEqual(1, len(self.cuts))
        self.assertIn('did not answer', self.cuts[0])
        # Given up for good: a reconnect is refused.
        reader2, _ = await self._connect()
        self.assertEqual(b'', await asyncio.wait_for(reader2.read(), 2))
