"""A direct-kernel boot's kernel and initrd go to the secondary over the
data stream (ft.boot_files): what a secondary accepts, keeps and names,
and what it refuses (oversized, wrong hash, path games)."""

import asyncio
import hashlib
import json
import os
import stat
import tempfile
import unittest
import xml.etree.ElementTree as ET
from unittest import mock

from mftvm_openstack.contract import limits
from mftvm_openstack.contract.hello import BootFile, Hello, NbdTargetInfo
from mftvm_openstack.contract.record import ContractError
from mftvm_openstack.contract.states import State
from mftvm_openstack.ft import boot_files, libvirt_domain, pair, vm
from mftvm_openstack.ft.domain_policy import DomainRefused
from mftvm_openstack.ft.transport import Kind, Message
from tests.unit.fake_clock import FakeClock, settle
from tests.unit.test_domain_policy import LAYERS, NOVA, SERIAL, UUID
from tests.unit.test_pair import (
    FakeChannel,
    FakeGuest,
    FakeMonitor,
    FakeProtector,
    FakeReplica,
    FakeStore,
    hello,
    until,
)

KERNEL = b'\x7fkernel-bytes' * 1000
INITRD = b'initrd-bytes' * 700
#: where Nova's libvirt driver puts Glance's kernel and ramdisk
NOVA_KERNEL = f'/var/lib/nova/instances/{UUID}/kernel'
NOVA_RAMDISK = f'/var/lib/nova/instances/{UUID}/ramdisk'
#: Nova's domain booted from them
NOVA_DIRECT = NOVA.replace(
    '<os>', f'<os><kernel>{NOVA_KERNEL}</kernel>'
            f'<initrd>{NOVA_RAMDISK}</initrd>'
            f'<cmdline>root=/dev/vda console=ttyS0</cmdline>', 1)


def announced(*files):
    return tuple(boot_files.announce(role, data) for role, data in files)


def boot_hello(files=(('kernel', KERNEL), ('initrd', INITRD)), **kw):
    return Hello(**{**hello().to_dict(), 'boot_files': announced(*files),
                    **kw})


def frames_after(hello_record, *payloads, kinds=None):
    msgs = [Message(Kind.HELLO, 0, json.dumps(
        hello_record.to_dict()).encode())]
    for index, payload in enumerate(payloads):
        kind = kinds[index] if kinds else Kind.BOOT_FILE
        msgs.append(Message(kind, index, payload))
    return msgs


class SecondaryReceivesBootFilesTest(unittest.IsolatedAsyncioTestCase):

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)
        self.boot_dir = os.path.join(self.tmp.name, 'secondary', 'boot')

    async def handshake(self, *msgs, boot_dir='default', answer=True):
        self.clock = FakeClock()
        self.prepared = []

        async def prepare(h):
            self.prepared.append(h)
            return pair.Prepared(FakeReplica(), FakeStore(),
                                 NbdTargetInfo(socket='/nbd'))

        async def activate(committed):
            pass
        self.machine = pair.SecondaryPair(
            prepare=prepare, activate=activate, clock=self.clock,
            boot_dir=self.boot_dir if boot_dir == 'default' else boot_dir)
        runner = asyncio.ensure_future(self.machine.run())
        self.addAsyncCleanup(self._stop, runner)
        self.machine.post(pair.Listening())
        chan = FakeChannel(self.clock)
        for msg in msgs:
            chan.inbox.put_nowait(msg)
        self.machine.post(pair.Connected(chan))
        await settle()
        if answer:
            # (the files are written in a worker thread, in real time)
            await until(lambda: chan.sent)
            await settle()
        return chan

    async def _stop(self, runner):
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)

    def assert_refused(self, chan, why):
        self.assertEqual([Kind.ERROR], chan.kinds())
        self.assertIn(why, chan.frames(Kind.ERROR)[0].json()['error'])
        self.assertTrue(chan.closed)
        self.assertEqual([], self.prepared)        # nothing made for it
        self.assertEqual({}, self.machine.boot_files)
        self.assertEqual(State.WAITING_FOR_PRIMARY, self.machine.state)

    async def test_kept_as_private_files_named_by_their_role(self):
        chan = await self.handshake(*frames_after(boot_hello(), KERNEL,
                                                  INITRD))
        self.assertEqual([Kind.READY], chan.kinds())
        self.assertEqual(State.STANDBY, self.machine.state)
        self.assertEqual({'kernel': f'{self.boot_dir}/kernel',
                          'initrd': f'{self.boot_dir}/initrd'},
                         self.machine.boot_files)
        for role, data in (('kernel', KERNEL), ('initrd', INITRD)):
            path = self.machine.boot_files[role]
            with open(path, 'rb') as f:
                self.assertEqual(data, f.read())
            self.assertEqual(0o600, stat.S_IMODE(os.stat(path).st_mode))
        self.assertEqual(0o700, stat.S_IMODE(os.stat(self.boot_dir).st_mode))

    async def test_a_hello_without_boot_files_keeps_none(self):
        chan = await self.handshake(*frames_after(hello()))
        self.assertEqual([Kind.READY], chan.kinds())
        self.assertEqual({}, self.machine.boot_files)
        self.assertFalse(os.path.exists(self.boot_dir))

    async def test_a_wrong_hash_is_refused_and_nothing_written(self):
        chan = await self.handshake(*frames_after(
            boot_hello(), KERNEL[:-1] + b'X', INITRD))
        self.assert_refused(chan, 'sha256')
        self.assertFalse(os.path.exists(f'{self.boot_dir}/kernel'))

    async def test_a_frame_longer_than_announced_is_refused_unread(self):
        small = boot_hello(files=(('kernel', b'k' * 10),))
        chan = await self.handshake(*frames_after(small, b'k' * 11))
        self.assert_refused(chan, 'too large')

    async def test_a_frame_shorter_than_announced_is_refused(self):
        chan = await self.handshake(*frames_after(
            boot_hello(files=(('kernel', KERNEL),)), KERNEL[:-1]))
        self.assert_refused(chan, 'announced')

    async def test_frames_out_of_order_or_of_another_kind(self):
        chan = await self.handshake(*frames_after(boot_hello(), INITRD,
                                                  KERNEL)[:1],
                                    Message(Kind.BOOT_FILE, 1, INITRD))
        self.assert_refused(chan, 'expected BOOT_FILE 0 (kernel)')
        chan = await self.handshake(*frames_after(
            boot_hello(), KERNEL, kinds=[Kind.CHECKPOINT]))
        self.assert_refused(chan, 'got CHECKPOINT')

    async def test_a_primary_that_never_sends_them_is_refused(self):
        chan = await self.handshake(*frames_after(boot_hello(), KERNEL),
                                    answer=False)
        # The kernel is written in a worker thread, in real time; only
        # then does the wait for the initrd start on the fake clock.
        await until(lambda: self.clock.waiting())
        self.assertEqual([], chan.kinds())
        with self.assertLogs('mftvm_openstack.ft.pair', 'ERROR'):
            await self.clock.advance(self.machine.hello_timeout + 1)
        self.assert_refused(chan, '')

    async def test_a_role_announced_twice_is_refused(self):
        twice = boot_hello(files=(('kernel', KERNEL), ('kernel', KERNEL)))
        chan = await self.handshake(*frames_after(twice, KERNEL, KERNEL))
        self.assert_refused(chan, 'twice')

    async def test_a_secondary_without_a_boot_dir_takes_none(self):
        chan = await self.handshake(*frames_after(boot_hello(), KERNEL,
                                                  INITRD), boot_dir=None)
        self.assert_refused(chan, 'takes no boot files')

    async def test_the_next_primary_without_boot_files_names_none(self):
        chan = await self.handshake(*frames_after(boot_hello(), KERNEL,
                                                  INITRD))
        self.assertEqual([Kind.READY], chan.kinds())
        chan = await self.handshake(*frames_after(hello()))
        self.assertEqual({}, self.machine.boot_files)


class AnnouncementTest(unittest.TestCase):
    """The HELLO's boot_files are checked before a byte is read."""

    def announce(self, **fields):
        good = {'role': 'kernel', 'size': 3, 'sha256': 'a' * 64}
        return Hello.from_dict({**hello().to_dict(),
                                'boot_files': [{**good, **fields}]})

    def test_a_good_announcement(self):
        self.assertEqual((BootFile('kernel', 3, 'a' * 64),),
                         self.announce().boot_files)

    def test_oversized(self):
        with self.assertRaisesRegex(ContractError, 'size'):
            self.announce(size=limits.BOOT_FILE_MAX_BYTES + 1)

    def test_path_games_in_the_role(self):
        # The role is the secondary's file name: only the two it knows.
        for role in ('../../etc/cron.d/x', '/etc/passwd', 'kernel/../x',
                     'ramdisk', ''):
            with self.subTest(role=role), \
                    self.assertRaisesRegex(ContractError, 'role'):
                self.announce(role=role)

    def test_a_hash_that_is_not_one(self):
        for digest in ('A' * 64, 'a' * 63, 'z' * 64):
            with self.subTest(digest=digest), \
                    self.assertRaisesRegex(ContractError, 'sha256'):
                self.announce(sha256=digest)

    def test_more_than_one_of_each(self):
        with self.assertRaisesRegex(ContractError, 'boot_files'):
            Hello.from_dict({**hello().to_dict(), 'boot_files': [
                {'role': 'kernel', 'size': 1, 'sha256': 'a' * 64}] * 3})


class PrimarySendsBootFilesTest(unittest.IsolatedAsyncioTestCase):

    async def test_each_follows_the_hello_in_its_order(self):
        clock = FakeClock()
        protector = FakeProtector(clock, [])
        data = [KERNEL, INITRD]

        async def boot():
            return data
        protector.boot_files = boot
        machine = pair.PrimaryPair(protector=protector, clock=clock,
                                   epoch_ms=10_000)
        runner = asyncio.ensure_future(machine.run())
        self.addAsyncCleanup(self._stop, runner)
        machine.post(pair.GuestUp(FakeGuest(), FakeMonitor()))
        machine.post(pair.Protect('unix:/sec', 'pair-1'))
        await settle()
        self.assertEqual(State.PROTECTED, machine.state)
        chan = protector.channels[-1]
        self.assertEqual([Kind.HELLO, Kind.BOOT_FILE, Kind.BOOT_FILE],
                         chan.kinds()[:3])
        self.assertEqual([(0, KERNEL), (1, INITRD)],
                         [(m.epoch, m.payload)
                          for m in chan.frames(Kind.BOOT_FILE)])

    async def _stop(self, runner):
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


class ReadTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.addCleanup(self.tmp.cleanup)

    def test_read_and_announce(self):
        path = os.path.join(self.tmp.name, 'kernel')
        with open(path, 'wb') as f:
            f.write(KERNEL)
        self.assertEqual(KERNEL, boot_files.read(path))
        self.assertEqual(BootFile('kernel', len(KERNEL),
                                  hashlib.sha256(KERNEL).hexdigest()),
                         boot_files.announce('kernel', KERNEL))

    def test_oversized_is_refused_before_it_is_read(self):
        path = os.path.join(self.tmp.name, 'kernel')
        with open(path, 'wb') as f:
            f.truncate(limits.BOOT_FILE_MAX_BYTES + 1)     # sparse
        with self.assertRaisesRegex(boot_files.BootFileError,
                                    'more than'):
            boot_files.check(path)
        with mock.patch('builtins.open', side_effect=AssertionError), \
                self.assertRaisesRegex(boot_files.BootFileError,
                                       'more than'):
            boot_files.read(path)

    def test_not_a_regular_file(self):
        fifo = os.path.join(self.tmp.name, 'fifo')
        os.mkfifo(fifo)
        for path in (self.tmp.name, '/dev/null'):
            with self.subTest(path=path), \
                    self.assertRaisesRegex(boot_files.BootFileError,
                                           'not a regular file'):
                boot_files.check(path)
        with self.assertRaisesRegex(boot_files.BootFileError,
                                    'not a regular file'):
            boot_files.check(fifo)
        with self.assertRaisesRegex(boot_files.BootFileError, 'No such'):
            boot_files.read(os.path.join(self.tmp.name, 'none'))

    def test_named_by_a_domain(self):
        self.assertEqual({'kernel': NOVA_KERNEL, 'initrd': NOVA_RAMDISK},
                         boot_files.named_by(NOVA_DIRECT))
        self.assertEqual({}, boot_files.named_by(NOVA))


class RestoreWithBootFilesTest(unittest.TestCase):
    """The secondary's policy names its own copies, nothing else."""

    OWN = {'kernel': '/srv/mftvm/vm0/secondary/boot/kernel',
           'initrd': '/srv/mftvm/vm0/secondary/boot/initrd'}

    def restore(self, xml, **kw):
        return ET.fromstring(libvirt_domain.restore_xml(
            xml, LAYERS, SERIAL, readonly_dirs=(os.path.dirname(
                NOVA_KERNEL),), uuid=UUID, **kw))

    def test_the_primarys_paths_are_replaced_by_the_copies(self):
        root = self.restore(NOVA_DIRECT, boot_files=self.OWN)
        self.assertEqual(self.OWN['kernel'], root.findtext('os/kernel'))
        self.assertEqual(self.OWN['initrd'], root.findtext('os/initrd'))
        self.assertEqual('root=/dev/vda console=ttyS0',
                         root.findtext('os/cmdline'))
        self.assertNotIn(NOVA_KERNEL, ET.tostring(root, 'unicode'))

    def test_without_the_copies_the_domain_is_refused(self):
        # (what the cloud lab met before the primary shipped them)
        with self.assertRaisesRegex(DomainRefused, 'domain/os/kernel: .* '
                                    'is not a file this host was given'):
            self.restore(NOVA_DIRECT)
        with self.assertRaisesRegex(DomainRefused, 'domain/os/initrd'):
            self.restore(NOVA_DIRECT,
                         boot_files={'kernel': self.OWN['kernel']})

    def test_a_copy_names_nothing_the_domain_does_not_boot(self):
        root = self.restore(NOVA, boot_files=self.OWN)
        self.assertIsNone(root.find('os/kernel'))
        self.assertIsNone(root.find('os/initrd'))


class PrimaryCheckTest(unittest.TestCase):
    """The primary protects a direct-kernel domain whose files it can
    ship, and refuses one whose files it cannot, visibly, at once."""

    def setUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        self.kernel = os.path.join(tmp.name, 'kernel')
        self.ramdisk = os.path.join(tmp.name, 'ramdisk')
        for path in (self.kernel, self.ramdisk):
            with open(path, 'wb') as f:
                f.write(b'x')
        self.spec = vm.GuestSpec(name=UUID, domain='instance-00000007')
        self.xml = NOVA_DIRECT.replace(NOVA_KERNEL, self.kernel).replace(
            NOVA_RAMDISK, self.ramdisk)

    def check(self):
        libvirt_domain.check_restorable(
            self.xml, self.spec,
            readonly_dirs=(os.path.dirname(NOVA_KERNEL),))

    def test_files_it_can_ship(self):
        self.check()

    def test_a_file_it_cannot_ship(self):
        os.unlink(self.ramdisk)
        with self.assertRaisesRegex(ValueError, 'ramdisk'):
            self.check()
        os.mkfifo(self.ramdisk)
        with self.assertRaisesRegex(ValueError, 'not a regular file'):
            self.check()
