"""The NBD relay forwards both ways and cuts a peer that stops answering.

The stall timers are fakes the tests fire themselves (no waiting for a
timeout), except in one test that lets a real 10 ms timer run out.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import unittest

from mftvm_openstack.ft.disk import NbdTarget
from mftvm_openstack.ft.relay import NbdRelay


class FakeTimer:

    def __init__(self, delay, callback):
        self.delay = delay
        self.callback = callback
        self.cancelled = False

    def cancel(self):
        self.cancelled = True


class FakeTimers:
    """``call_later`` for the relay: records timers, fires on demand."""

    def __init__(self):
        self.timers: list[FakeTimer] = []

    def call_later(self, delay, callback):
        timer = FakeTimer(delay, callback)
        self.timers.append(timer)
        return timer

    def pending(self):
        return [t for t in self.timers if not t.cancelled]

    def run_out(self):
        """Let any time pass: every pending timer fires."""
        for timer in self.pending():
            timer.cancelled = True
            timer.callback()


class RelayTest(unittest.IsolatedAsyncioTestCase):

    async def asyncSetUp(self):
        self.dir = tempfile.mkdtemp()
        self.answering = True
        self.unanswered = asyncio.Queue()
        self.server = await asyncio.start_unix_server(
            self._serve, os.path.join(self.dir, 'up.sock'))
        self.cuts: list[str] = []
        self.relays: list[NbdRelay] = []
        self.handlers: set[asyncio.Task] = set()
        self.timers = FakeTimers()
        self.relay = await self._relay(0.5, self.timers.call_later)

    async def _relay(self, stall_timeout, call_later=None):
        relay = NbdRelay(
            NbdTarget(socket=os.path.join(self.dir, 'up.sock')),
            os.path.join(self.dir, f'relay{stall_timeout}.sock'),
            stall_timeout=stall_timeout, on_cut=self.cuts.append,
            call_later=call_later)
        self.local = await relay.start()
        self.relays.append(relay)
        return relay

    async def asyncTearDown(self):
        for relay in self.relays:
            await relay.close()
        self.server.close()
        # The relays closed their upstream ends: the export's side ends.
        await asyncio.wait_for(asyncio.gather(*self.handlers), 2)

    async def _serve(self, reader, writer):
        # A stand-in export: answers each request line, unless frozen.
        self.handlers.add(asyncio.current_task())
        while line := await reader.readline():
            if self.answering:
                writer.write(b'ok ' + line)
                await writer.drain()
            else:
                self.unanswered.put_nowait(line)

    async def _connect(self):
        return await asyncio.open_unix_connection(self.local.socket)

    async def test_forwards_both_ways(self):
        reader, writer = await self._connect()
        for i in range(3):
            writer.write(b'write %d\n' % i)
            self.assertEqual(b'ok write %d\n' % i,
                             await asyncio.wait_for(reader.readline(), 2))
            # Each request started a stall timer; its answer stopped it.
            self.assertEqual(i + 1, len(self.timers.timers))
            self.assertEqual(0.5, self.timers.timers[-1].delay)
            self.assertEqual([], self.timers.pending())
        # Idle (nothing outstanding) is not a stall, however long.
        self.timers.run_out()
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
        self.assertEqual(b'stuck\n',
                         await asyncio.wait_for(self.unanswered.get(), 2))
        [stall] = self.timers.pending()
        self.assertEqual(0.5, stall.delay)
        self.assertEqual([], self.cuts)         # not before it runs out
        self.timers.run_out()
        # QEMU's side of the connection ends: its requests fail at once.
        self.assertEqual(b'', await asyncio.wait_for(reader.read(), 3))
        self.assertEqual(1, len(self.cuts))
        self.assertIn('did not answer for 0.5s', self.cuts[0])
        # Given up for good: a reconnect is refused.
        reader2, _ = await self._connect()
        self.assertEqual(b'', await asyncio.wait_for(reader2.read(), 2))

    async def test_real_stall_timer_cuts(self):
        # The default timers are the loop's: a 10 ms stall is cut.
        await self._relay(0.01)
        reader, writer = await self._connect()
        self.answering = False
        writer.write(b'stuck\n')
        self.assertEqual(b'', await asyncio.wait_for(reader.read(), 2))
        self.assertEqual(1, len(self.cuts))
        self.assertIn('did not answer', self.cuts[0])
