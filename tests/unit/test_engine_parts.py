"""Trackers, data-plane framing and output commit, without QEMU."""

import asyncio
import gc
import json
import mmap
import os
import socket
import struct
import tempfile
import unittest
import unittest.mock

import numpy as np
from qemu.qmp import message as qmp_message

from mftvm_openstack.ft import epoch, trackers, transport
from mftvm_openstack.ft.monitor import Monitor, QMPMonitor
from mftvm_openstack.ft.network import OutputBuffer
from mftvm_openstack.ft.trackers import PAGE_SIZE, RamDelta
from mftvm_openstack.ft.transport import Kind


class ScanTrackerTest(unittest.TestCase):

    def setUp(self):
        fd, self.path = tempfile.mkstemp(dir='/dev/shm')
        os.ftruncate(fd, 64 * PAGE_SIZE)
        self.map = mmap.mmap(fd, 64 * PAGE_SIZE)
        os.close(fd)
        self.addCleanup(os.unlink, self.path)

    def write(self, page, offset, value):
        self.map[page * PAGE_SIZE + offset] = value

    def test_first_collect_ships_non_zero_pages_then_only_changes(self):
        self.write(3, 0, 1)
        self.write(40, 4095, 2)
        tracker = trackers.ScanTracker(self.path, 64 * PAGE_SIZE, 0)
        tracker.CHUNK = 7  # exercise chunk edges
        tracker.start()
        delta = tracker.collect()
        self.assertEqual([3, 40], sorted(delta.indices.tolist()))
        self.assertEqual(0, len(tracker.collect().indices))
        self.write(63, 100, 9)
        self.write(3, 0, 0)  # back to zero is a change too
        delta = tracker.collect()
        order = np.argsort(delta.indices)
        self.assertEqual([3, 63], delta.indices[order].tolist())
        # The delta holds copies: later writes do not alter it.
        self.write(63, 100, 77)
        self.assertEqual(9, delta.pages[order][1][100])
        self.assertEqual(0, delta.pages[order][0][0])
        tracker.close()

    def test_auto_picks_hash_where_soft_dirty_is_missing(self):
        cls = trackers.tracker_class('auto')
        if trackers.SoftDirtyTracker.unavailable_reason():
            self.assertIs(trackers.HashTracker, cls)
        else:
            self.assertIs(trackers.SoftDirtyTracker, cls)

    def test_auto_picks_scan_where_neither_works(self):
        def no_extension():
            raise ImportError('no _pagehash')
        with unittest.mock.patch.object(
                trackers.SoftDirtyTracker, 'unavailable_reason',
                return_value='no soft-dirty here'), \
                unittest.mock.patch.object(trackers, '_pagehash_module',
                                           no_extension):
            self.assertIs(trackers.ScanTracker,
                          trackers.tracker_class('auto'))
            self.assertRaisesRegex(trackers.TrackerError,
                                   'hash cannot run here.*no _pagehash',
                                   trackers.tracker_class, 'hash')

    def test_unknown_tracker_is_refused(self):
        self.assertRaisesRegex(trackers.TrackerError, 'unknown dirty tracker',
                               trackers.tracker_class, 'bogus')


class SoftDirtyParsingTest(unittest.TestCase):

    def test_find_mapping(self):
        maps = ('7f00-7f10 rw-p 00000000 00:00 0 \n'
                '7fa000000000-7fa008000000 rw-s 00000000 00:1a 99   '
                '         /dev/shm/mftvm-vm0-primary.ram\n')
        self.assertEqual((0x7fa000000000, 0x7fa008000000),
                         trackers.find_mapping(
                             maps, '/dev/shm/mftvm-vm0-primary.ram'))
        self.assertRaises(trackers.TrackerError, trackers.find_mapping,
                          maps, '/other')

    def test_soft_dirty_bits(self):
        entries = [0, 1 << 55, (1 << 63) | 5, (1 << 63) | (1 << 55)]
        data = struct.pack('<4Q', *entries)
        self.assertEqual([1, 3], trackers.soft_dirty_pages(data).tolist())


class FramingTest(unittest.IsolatedAsyncioTestCase):

    async def pair(self, stall_timeout=None, tcp=False):
        if tcp:
            addr = transport.DataAddress(host='127.0.0.1', port=0)
        else:
            addr = transport.DataAddress(
                path=tempfile.mktemp(dir='/tmp', suffix='.sock'))
        accepted = asyncio.get_running_loop().create_future()

        async def on_connect(chan):
            accepted.set_result(chan)
        server = await transport.serve(addr, on_connect,
                                       stall_timeout=stall_timeout)
        self.addCleanup(server.close)
        if tcp:
            port = server.sockets[0].getsockname()[1]
            addr = transport.DataAddress(host='127.0.0.1', port=port)
        client = await transport.Channel.connect(
            addr, stall_timeout=stall_timeout)
        self.addCleanup(client.close)
        return client, await accepted

    async def test_checkpoint_round_trip(self):
        client, server = await self.pair()
        pages = np.arange(3 * PAGE_SIZE, dtype=np.uint8).reshape(3, -1)
        delta = RamDelta(np.array([5, 1, 9], np.uint32), pages)
        await client.send(Kind.CHECKPOINT, 42,
                          *transport.encode_checkpoint(b'state', delta))
        msg = await server.recv(timeout=5)
        self.assertEqual((Kind.CHECKPOINT, 42), (msg.kind, msg.epoch))
        dev, got = transport.decode_checkpoint(msg.payload)
        self.assertEqual(b'state', dev)
        self.assertEqual([5, 1, 9], got.indices.tolist())
        self.assertTrue((got.pages == pages).all())

    async def test_large_checkpoint_survives_partial_sends(self):
        client, server = await self.pair()
        pages = np.random.randint(0, 255, (4096, PAGE_SIZE), np.uint8)
        delta = RamDelta(np.arange(4096, dtype=np.uint32), pages)
        # 16 MiB into a socket nobody reads yet: the kernel takes a part,
        # the transport keeps the rest and sends it in pieces.
        sending = asyncio.ensure_future(client.send(
            Kind.CHECKPOINT, 7, *transport.encode_checkpoint(b'dev', delta)))
        await asyncio.sleep(0)          # it runs until the socket is full
        self.assertFalse(sending.done())
        marking = asyncio.ensure_future(client.send(Kind.MARK, 8))
        msg = await asyncio.wait_for(server.recv(), 5)
        await sending
        await marking
        _, got = transport.decode_checkpoint(msg.payload)
        self.assertTrue((got.pages == pages).all())
        follow = await asyncio.wait_for(server.recv(timeout=5), 5)
        self.assertEqual((Kind.MARK, 8), (follow.kind, follow.epoch))

    async def test_empty_checkpoint_round_trip(self):
        # An idle guest dirties nothing in an epoch.
        client, server = await self.pair()
        await client.send(Kind.CHECKPOINT, 3, *transport.encode_checkpoint(
            b'dev', RamDelta.empty()))
        dev, delta = transport.decode_checkpoint(
            (await server.recv(timeout=5)).payload)
        self.assertEqual((b'dev', 0), (dev, len(delta.indices)))

    async def test_garbage_is_a_protocol_error(self):
        client, server = await self.pair()
        client._writer.write(b'GET / HTTP/1.0\r\n\r\n' + b'x' * 16)
        with self.assertRaisesRegex(transport.ProtocolError, 'magic'):
            await server.recv(timeout=5)

    async def test_oversized_and_unknown_frames_are_refused(self):
        client, server = await self.pair()
        client._writer.write(transport.HEADER.pack(b'MFTV', 5, 0, 1 << 50))
        with self.assertRaisesRegex(transport.ProtocolError, 'too large'):
            await server.recv(timeout=5)
        client, server = await self.pair()
        client._writer.write(transport.HEADER.pack(b'MFTV', 99, 0, 0))
        with self.assertRaisesRegex(transport.ProtocolError, 'unknown'):
            await server.recv(timeout=5)

    async def test_truncated_checkpoint_is_refused(self):
        delta = RamDelta(np.array([1], np.uint32),
                         np.zeros((1, PAGE_SIZE), np.uint8))
        payload = b''.join(bytes(memoryview(b)) for b in
                           transport.encode_checkpoint(b'd', delta))
        self.assertRaises(transport.ProtocolError,
                          transport.decode_checkpoint, payload[:-1])

    async def test_frame_stalled_mid_payload_breaks_the_stream(self):
        # A primary frozen while sending a big delta (SIGSTOP, power
        # loss): its header and part of the payload came, then nothing.
        client, server = await self.pair(stall_timeout=0.2)
        client._writer.write(transport.HEADER.pack(b'MFTV', Kind.CHECKPOINT,
                                                   5, 1 << 20))
        client._writer.write(b'x' * 1000)
        with self.assertRaisesRegex(ConnectionError, 'stalled mid-frame'):
            # (the outer bound only keeps a hang from hanging the tests)
            await asyncio.wait_for(server.recv(timeout=5), 10)

    async def test_slow_frame_that_keeps_coming_arrives(self):
        # The stall timeout bounds the silence inside a frame, not the
        # time the whole frame takes.
        client, server = await self.pair(stall_timeout=2.0)
        client._writer.write(transport.HEADER.pack(b'MFTV', Kind.ERROR,
                                                   1, 40))

        async def trickle():
            for _ in range(4):
                await asyncio.sleep(0.05)
                client._writer.write(b'y' * 10)
        sending = asyncio.ensure_future(trickle())
        msg = await asyncio.wait_for(server.recv(timeout=5), 10)
        await sending
        self.assertEqual(b'y' * 40, msg.payload)

    async def test_tcp_streams_detect_a_dead_peer(self):
        client, server = await self.pair(stall_timeout=1.5, tcp=True)
        for chan in (client, server):
            sock = chan._writer.get_extra_info('socket')
            self.assertEqual(1, sock.getsockopt(socket.SOL_SOCKET,
                                                socket.SO_KEEPALIVE))
            self.assertEqual(2, sock.getsockopt(socket.IPPROTO_TCP,
                                                socket.TCP_KEEPIDLE))
            self.assertEqual(1, sock.getsockopt(socket.IPPROTO_TCP,
                                                socket.TCP_KEEPINTVL))
            self.assertEqual(transport.KEEPALIVE_PROBES, sock.getsockopt(
                socket.IPPROTO_TCP, socket.TCP_KEEPCNT))
            self.assertEqual(3000, sock.getsockopt(socket.IPPROTO_TCP,
                                                   socket.TCP_USER_TIMEOUT))

    async def test_closed_stream(self):
        client, server = await self.pair()
        client.close()
        with self.assertRaises(ConnectionError):
            await server.recv(timeout=5)

    def test_addresses(self):
        self.assertEqual('tcp:10.0.0.1:4444', str(
            transport.DataAddress.parse('tcp:10.0.0.1:4444')))
        self.assertRaises(ValueError, transport.DataAddress.parse, 'tcp:x')


class FakeFilterMonitor:
    """Plays QEMU's side of the filter-redirector: connects to the
    chardev sockets it is given, like QEMU's chardev-add does."""

    def __init__(self):
        self.streams = {}

    async def execute(self, command, **args):
        if command == 'chardev-add':
            path = args['backend']['data']['addr']['data']['path']
            self.streams[args['id']] = await asyncio.open_unix_connection(
                path)
        return {}

    async def guest_sends(self, frame):
        _, writer = self.streams['oc-out']
        writer.write(struct.pack('!I', len(frame)) + frame)
        await writer.drain()

    async def network_got(self, timeout=0.01):
        """The next frame the buffer let out; None if none came within
        ``timeout`` (a frame let out is in the socket at once: the
        buffer counts it in ``frames_released`` when it writes it)."""
        reader, _ = self.streams['oc-in']
        try:
            head = await asyncio.wait_for(reader.readexactly(4), timeout)
        except TimeoutError:
            return None
        return await reader.readexactly(struct.unpack('!I', head)[0])


class OutputBufferTest(unittest.IsolatedAsyncioTestCase):

    async def test_frames_leave_only_after_their_epoch_commits(self):
        d = tempfile.mkdtemp()
        out = OutputBuffer(os.path.join(d, 'o'), os.path.join(d, 'i'))
        mon = FakeFilterMonitor()
        await out.attach(mon)
        self.addAsyncCleanup(out.close)
        self.assertFalse(out.waiting.is_set())
        await mon.guest_sends(b'epoch1-a')
        # A held frame: somebody may wait for this epoch to commit.
        await asyncio.wait_for(out.waiting.wait(), 2)
        self.assertEqual(1, out.held)
        out.seal(1)                      # checkpoint 1 taken
        self.assertFalse(out.waiting.is_set())
        await mon.guest_sends(b'epoch2-a')
        await asyncio.wait_for(out.waiting.wait(), 2)
        self.assertEqual((2, 0), (out.held, out.frames_released))
        self.assertIsNone(await mon.network_got())
        await out.release(1)
        self.assertEqual((1, 1), (out.held, out.frames_released))
        self.assertEqual(b'epoch1-a', await mon.network_got(2))
        self.assertIsNone(await mon.network_got())
        out.seal(2)
        await out.release(2)
        self.assertEqual((0, 2), (out.held, out.frames_released))
        self.assertEqual(b'epoch2-a', await mon.network_got(2))

    async def test_held_bytes_are_counted_and_reported(self):
        d = tempfile.mkdtemp()
        out = OutputBuffer(os.path.join(d, 'o'), os.path.join(d, 'i'))
        heard = []
        out.on_held = heard.append
        mon = FakeFilterMonitor()
        await out.attach(mon)
        self.addAsyncCleanup(out.close)
        await mon.guest_sends(b'a' * 100)
        await asyncio.wait_for(out.waiting.wait(), 2)
        out.seal(1)
        await mon.guest_sends(b'b' * 50)
        await asyncio.wait_for(out.waiting.wait(), 2)
        self.assertEqual(([100, 150], 150), (heard, out.held_bytes))
        # the oldest frame's epoch: the next ACK that frees any
        self.assertEqual(1, out.oldest_epoch)
        await out.release(1)
        self.assertEqual(50, out.held_bytes)
        self.assertEqual(2, out.oldest_epoch)
        out.discard()
        self.assertEqual(0, out.held_bytes)
        self.assertIsNone(out.oldest_epoch)

    async def test_passthrough_releases_everything_and_stops_holding(self):
        d = tempfile.mkdtemp()
        out = OutputBuffer(os.path.join(d, 'o'), os.path.join(d, 'i'))
        mon = FakeFilterMonitor()
        await out.attach(mon)
        self.addAsyncCleanup(out.close)
        await mon.guest_sends(b'held')
        await asyncio.wait_for(out.waiting.wait(), 2)
        await out.passthrough()
        self.assertEqual(b'held', await mon.network_got(2))
        await mon.guest_sends(b'direct')
        self.assertEqual(b'direct', await mon.network_got(1))


class QMPEventsTest(unittest.IsolatedAsyncioTestCase):
    """QMPMonitor against a QMP server played here: greeting,
    capabilities, then events."""

    async def serve_events(self, count):
        path = tempfile.mktemp(dir='/tmp', suffix='.qmp')
        sent = asyncio.get_running_loop().create_future()

        async def qmp(reader, writer):
            writer.write(json.dumps({'QMP': {'version': {
                'qemu': {'major': 8, 'minor': 2, 'micro': 0},
                'package': ''}, 'capabilities': []}}).encode() + b'\r\n')
            await reader.read(4096)     # qmp_capabilities (no newline)
            writer.write(b'{"return": {}}\r\n')
            await writer.drain()
            await sent      # once a stream waits for the last event
            for n in range(count):
                writer.write(json.dumps({
                    'event': 'STOP' if n % 2 else 'RESUME',
                    'timestamp': {'seconds': n, 'microseconds': 0}})
                    .encode() + b'\r\n')
            writer.write(json.dumps({
                'event': 'MIGRATION', 'data': {'status': 'completed'},
                'timestamp': {'seconds': 0, 'microseconds': 0}})
                .encode() + b'\r\n')
            await writer.drain()
        server = await asyncio.start_unix_server(qmp, path)
        self.addCleanup(server.close)
        return path, sent

    async def test_events_nobody_waits_for_are_not_kept(self):
        # A guest protected for months gets millions of events (each
        # checkpoint: STOP, RESUME, MIGRATION...): none may pile up.
        path, sent = await self.serve_events(200)
        mon = await QMPMonitor.connect(path, timeout=5)
        self.addAsyncCleanup(mon.close)
        with mon.events('MIGRATION') as stream:
            sent.set_result(None)
            event = await stream.wait(timeout=5)
        self.assertEqual('completed', event['data']['status'])
        client = mon._client
        self.assertTrue(client.events.empty())
        self.assertEqual((), client.events.history)

    async def test_a_stream_keeps_only_what_is_still_to_be_read(self):
        # The disk sync watches its job for the whole protection: the
        # events it has read must not stay behind.
        path, sent = await self.serve_events(200)
        mon = await QMPMonitor.connect(path, timeout=5)
        self.addAsyncCleanup(mon.close)
        with mon.events() as stream:
            sent.set_result(None)
            for _ in range(201):
                await stream.wait(timeout=5)
            gc.collect()
            events = [o for o in gc.get_objects()
                      if isinstance(o, qmp_message.Message)
                      and 'event' in o]
            self.assertEqual([], events)


class FakeMigratingMonitor(Monitor):
    """Plays QEMU's side of a device-state migration: on ``migrate`` it
    streams bytes into the socket and, if ``announce``, sends the
    MIGRATION events the ``events`` capability turns on."""

    def __init__(self, announce=True):
        super().__init__()
        self.announce = announce
        self.calls = []

    async def execute(self, command, **args):
        self.calls.append(command)
        if command == 'migrate-set-capabilities':
            self.capabilities = {c['capability']: c['state']
                                 for c in args['capabilities']}
        if command == 'migrate':
            asyncio.ensure_future(self._migrate(args['uri'][len('unix:'):]))
        if command == 'query-migrate':
            return {'status': 'completed'}
        return {}

    async def _migrate(self, path):
        for status in ('setup', 'active', 'device'):
            self._announce(status)
        _, writer = await asyncio.open_unix_connection(path)
        writer.write(b'device state')
        await writer.drain()
        writer.close()
        self._announce('completed')

    def _announce(self, status):
        if self.announce:
            self._dispatch({'event': 'MIGRATION',
                            'data': {'status': status}})

    async def close(self):
        pass


class FakeTracker:

    def start(self):
        pass

    def collect(self):
        return RamDelta.empty()


class CheckpointCaptureTest(unittest.IsolatedAsyncioTestCase):

    async def capture(self, monitor):
        capturer = epoch.CheckpointCapturer(monitor, FakeTracker(),
                                            tempfile.mkdtemp())
        capturer.end_timeout = 0.01
        await capturer.setup()
        marked = []

        async def mark(n):
            marked.append(n)
        ckpt = await capturer.capture(4, mark)
        self.assertEqual((4, b'device state', [4]),
                         (ckpt.epoch, ckpt.devstate, marked))
        return ckpt

    async def test_the_end_of_the_migration_is_announced_not_asked(self):
        monitor = FakeMigratingMonitor()
        await self.capture(monitor)
        self.assertTrue(monitor.capabilities['events'])
        self.assertNotIn('query-migrate', monitor.calls)
        self.assertEqual(['stop', 'migrate', 'cont'],
                         [c for c in monitor.calls if c in
                          ('stop', 'migrate', 'cont')])

    async def test_the_disks_settle_before_the_save_and_the_mark(self):
        # The end of the device-state save inactivates QEMU's block
        # nodes: a disk job still writing then would abort QEMU. The
        # save and the mark wait for the disk sync's part; RAM does not.
        monitor = FakeMigratingMonitor()
        capturer = epoch.CheckpointCapturer(monitor, FakeTracker(),
                                            tempfile.mkdtemp())
        capturer.end_timeout = 0.01
        await capturer.setup()
        order = []

        async def settle(n):
            order.append(('settle', n, 'migrate' in monitor.calls))
            await asyncio.sleep(0.05)       # a mirror's tail in flight
            order.append(('settled', n, 'migrate' in monitor.calls))

        async def mark(n):
            order.append(('mark', n))
        ckpt = await capturer.capture(4, mark, settle=settle)
        self.assertEqual(b'device state', ckpt.devstate)
        self.assertEqual([('settle', 4, False), ('settled', 4, False),
                          ('mark', 4)], order)
        self.assertEqual(['stop', 'migrate', 'cont'],
                         [c for c in monitor.calls if c in
                          ('stop', 'migrate', 'cont')])

    async def test_without_the_announcement_it_asks(self):
        monitor = FakeMigratingMonitor(announce=False)
        await self.capture(monitor)
        self.assertEqual(1, monitor.calls.count('query-migrate'))
