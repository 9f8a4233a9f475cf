"""The epoch engine on a libvirt domain (real libvirtd, real QEMU, TCG).

The primary is a libvirt domain; the engine drives it only through
:class:`LibvirtMonitor` (QMP passed through libvirt) and reads guest RAM
from the shared file libvirt gave the domain. ``LibvirtEpochTest`` takes
checkpoints by hand, kills the domain's QEMU and restores the last
committed epoch as a second libvirt domain (the other "host").
``LibvirtProtectionTest`` does it the way Nova's guests are protected: the
host processes adopt a running domain, replicate its disk and hold its
output, and the secondary restores it as a libvirt domain.

Needs the Debian packages libvirt-daemon-system (libvirtd, virtlogd) and
libvirt-dev + pkg-config (to build libvirt-python). libvirtd and
virtlogd are started here unless a libvirtd already answers on the
system socket (no systemd is needed), and left running.
"""

import asyncio
import dataclasses
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

import fixtures
import numpy as np
from testtools import content

from mftvm_openstack.contract.hello import PROTOCOL_VERSION, Hello
from mftvm_openstack.contract.states import State
from mftvm_openstack.ft import (
    epoch,
    libvirt_domain,
    libvirt_monitor,
    trackers,
    transport,
    vm,
)
from mftvm_openstack.images import records, workload
from mftvm_openstack.instance import client
from mftvm_openstack.local import operations
from tests.functional import base

URI = 'qemu:///system'


def _libvirtd_answers():
    return subprocess.run(['virsh', '-c', URI, 'version'],
                          capture_output=True).returncode == 0


class LibvirtDaemons(fixtures.Fixture):
    """virtlogd + libvirtd started by hand (system sockets), if needed.

    They are left running afterwards, as the system daemons they stand in
    for: tests in other worker processes use the same libvirtd, and one
    test's clean-up must not pull it from under another's guests. A lock
    keeps two workers from starting it at once.
    """

    LOCK = '/run/mftvm-test-libvirtd.lock'
    LOG_DIR = '/var/tmp/mftvm-test-libvirtd'

    def _setUp(self):
        with open(self.LOCK, 'w') as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if _libvirtd_answers():
                return
            os.makedirs(self.LOG_DIR, exist_ok=True)
            for daemon in ('virtlogd', 'libvirtd'):
                path = shutil.which(daemon) or f'/usr/sbin/{daemon}'
                with open(os.path.join(self.LOG_DIR, f'{daemon}.log'),
                          'ab') as log:
                    subprocess.Popen([path], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log,
                                     start_new_session=True)
            base.wait_for(_libvirtd_answers, 30, 0.2, 'libvirtd')


def start_domain(conn, spec, serial_path, uuid=None):
    """Start ``spec`` as a transient libvirt domain, the way Nova would
    have (the engine then gets only its name; Nova's domain has the
    instance's ``uuid``), with its port forwards open (libvirt 9 has
    none for the user-mode NIC: added through the monitor)."""
    conn.createXML(libvirt_domain.domain_xml(spec, serial_path, uuid=uuid),
                   0)

    async def open_forwards():
        monitor = await libvirt_monitor.LibvirtMonitor.open(URI, spec.name)
        try:
            await libvirt_domain.add_forwards(monitor, spec)
        finally:
            await monitor.close()
    asyncio.run(open_forwards())


def _qemu_pid(name):
    with open(f'/run/libvirt/qemu/{name}.pid') as f:
        return int(f.read().strip())


class LibvirtTestCase(base.GuestTestCase):
    """A guest test with this test's own libvirtd and virtlogd."""

    def setUp(self):
        super().setUp()
        try:
            import libvirt  # noqa: F401
        except ImportError:
            self.skipTest('libvirt-python is not installed')
        if not shutil.which('libvirtd') and not os.path.exists(
                '/usr/sbin/libvirtd'):
            self.skipTest('libvirtd is not installed '
                          '(apt-get install libvirt-daemon-system)')
        self.useFixture(LibvirtDaemons())


class LibvirtEpochTest(LibvirtTestCase):

    def test_checkpoints_through_libvirt_restore_into_libvirt(self):
        asyncio.run(self._run())

    async def _run(self):
        import libvirt

        conn = await libvirt_monitor.connect(URI)
        self.addCleanup(conn.close)
        name = f'mftvm-lv-{os.getpid()}'
        disk = self.make_disk()
        spec = vm.GuestSpec(
            name=name, kernel=self.image.kernel, initrd=self.image.initrd,
            disk=disk, append='console=ttyS0 quiet mftvm.run=writer '
            'mftvm.writer_interval_ms=5', disk_size=64 << 20)
        paths = vm.Paths(os.path.join(self.tmp, 'primary'))
        os.makedirs(paths.root)

        def destroy(dom):
            try:
                dom.destroy()
            except libvirt.libvirtError:
                pass  # already gone

        dom = await asyncio.to_thread(
            conn.createXML, libvirt_domain.domain_xml(spec, paths.serial), 0)
        self.addCleanup(destroy, dom)
        monitor = await libvirt_monitor.LibvirtMonitor.for_domain(
            conn, dom)
        self.addCleanup(asyncio.run, monitor.close())
        ram = await libvirt_domain.ram_file(monitor)
        self.assertTrue(os.path.exists(ram), ram)
        pid = _qemu_pid(name)
        tracker = trackers.ScanTracker(ram, spec.memory_bytes, pid)
        self.addCleanup(tracker.close)
        capturer = epoch.CheckpointCapturer(monitor, tracker, paths.root)
        await capturer.setup()
        replica_dir = os.path.join(self.tmp, 'replica')
        os.makedirs(replica_dir)
        replica_ram = vm.ram_path(f'lv-{os.getpid()}', 'test-replica')
        self.addCleanup(os.unlink, replica_ram)
        replica = epoch.ReplicaImage(replica_ram, spec.memory_bytes,
                                     replica_dir)
        self.addCleanup(replica.close)
        serial = base.SerialWatcher(paths.serial)
        self.addCleanup(serial.stop)
        await asyncio.to_thread(base.wait_for, lambda: len(serial.acks) > 3,
                                90, 0.05, 'the writer on the primary')

        # The last epoch's disk is copied while the guest is stopped (disk
        # replication has tests of its own).
        last = 12
        replica_disk = f'{disk}.replica'

        async def mark(n):
            if n == last:
                await asyncio.to_thread(shutil.copy, disk, replica_disk)

        pauses = []
        for n in range(1, last + 1):
            await asyncio.sleep(0.1)
            ckpt = await capturer.capture(n, mark)
            replica.apply(n, ckpt.devstate, ckpt.delta)
            pauses.append(ckpt.pause_s)
        self.assertEqual(last, replica.committed)
        self.addDetail('pauses_ms', content.text_content(
            ' '.join(f'{p * 1000:.0f}' for p in pauses)))
        # The guest runs on after the last checkpoint, then its host dies.
        acks_then = len(serial.acks)
        await asyncio.to_thread(base.wait_for,
                                lambda: len(serial.acks) > acks_then + 5,
                                30, 0.05, 'the primary running on')
        os.kill(pid, signal.SIGKILL)

        def gone():
            try:
                return not dom.isActive()
            except libvirt.libvirtError:
                return True  # a transient domain is undefined as it dies
        await asyncio.to_thread(base.wait_for, gone, 30, 0.1,
                                'libvirt to see its QEMU die')
        await monitor.close()
        serial.stop()

        # The other "host": a second domain from the replica.
        rpaths = vm.Paths(os.path.join(self.tmp, 'restored'))
        os.makedirs(rpaths.root)
        t0 = time.perf_counter()
        rdom, rmon = await libvirt_domain.restore(
            conn, spec, rpaths.serial, replica_ram, replica.devstate_path,
            [(replica_disk, 'raw')], name=f'{name}-b')
        restore_s = time.perf_counter() - t0
        self.addCleanup(destroy, rdom)
        self.addCleanup(asyncio.run, rmon.close())
        self.addDetail('restore_ms',
                       content.text_content(f'{restore_s * 1000:.0f}'))
        on_disk = records.verify_chain(records.read_records(replica_disk))
        watcher = base.SerialWatcher(rpaths.serial)
        self.addCleanup(watcher.stop)
        await asyncio.to_thread(
            base.wait_for, lambda: len(watcher.acks) >= 10, 60, 0.05,
            'ACKs from the restored guest')
        status = await rmon.execute('query-status')
        self.assertEqual('running', status['status'])
        state, _ = await asyncio.to_thread(rdom.state)
        self.assertEqual(libvirt.VIR_DOMAIN_RUNNING, state)
        await rmon.close()
        await asyncio.to_thread(destroy, rdom)
        watcher.stop()
        base.assert_ran_on_from_checkpoint(
            self, workload.read_text(rpaths.serial), on_disk, replica_disk)


class LibvirtProtectionTest(LibvirtTestCase):
    """A running libvirt domain (as Nova would start it) is adopted and
    protected by the host processes, loses its QEMU to SIGKILL, and runs
    on as a libvirt domain restored by the secondary: output commit,
    disk replication and the restore all go through libvirt."""

    def _destroy(self, conn, name):
        import libvirt
        try:
            conn.lookupByName(name).destroy()
        except libvirt.libvirtError:
            pass    # gone already

    def start_and_protect(self, name, restored, boot_dir=None):
        """Start domain ``name`` as Nova would, then protect it; return
        (libvirt connection, guest dir, counter's last answer).

        With ``boot_dir``, the domain boots from copies of the kernel and
        initrd in that directory (Nova's ``instances/<uuid>/kernel`` and
        ``ramdisk``, which only the primary's host has), and the guest
        spec names none: as Nova's driver protects a domain."""
        import libvirt

        disk = self.make_disk()
        kernel, initrd = self.image.kernel, self.image.initrd
        if boot_dir is not None:
            os.makedirs(boot_dir)
            kernel = shutil.copy(kernel, os.path.join(boot_dir, 'kernel'))
            initrd = shutil.copy(initrd, os.path.join(boot_dir, 'ramdisk'))
        spec = operations.make_spec(
            name, kernel, initrd, disk,
            append='console=ttyS0 quiet mftvm.run=writer,counter '
                   'mftvm.writer_interval_ms=20',
            memory_mib=128,
            nic=f'user,hostfwd=tcp:127.0.0.1:{self.port}-:7000')
        conn = libvirt.open(URI)
        self.addCleanup(conn.close)
        serial = os.path.join(self.tmp, 'domain-serial.log')
        start_domain(conn, spec, serial)
        self.addCleanup(self._destroy, conn, name)
        self.addCleanup(self._destroy, conn, restored)
        base.wait_for(lambda: 'COUNTER-READY' in workload.read_text(serial),
                      90, 0.2, 'the guest counter service')
        last = workload.counter_request('127.0.0.1', self.port, 10)
        self.assertIsNotNone(last)

        ft_spec = dataclasses.replace(spec, domain=name)
        if boot_dir is not None:
            ft_spec = dataclasses.replace(ft_spec, kernel='', initrd='')
        self.addCleanup(self._stop_guest, name)
        gdir = operations.protect(
            ft_spec, operations.ProtectOptions(epoch_ms=200), self.state_dir,
            host_options={'libvirt_uri': URI, 'domain_name': restored})
        prim = self.side(name, 'primary')
        self.assertEqual(State.PROTECTED, prim['state'])
        # The engine works on libvirt's QEMU, not one of its own.
        self.assertEqual(_qemu_pid(name), prim['qemu_pid'])
        return conn, gdir, last

    def test_adopted_domain_fails_over_into_a_libvirt_domain(self):
        import libvirt

        name = f'mftvm-lvp-{os.getpid()}'
        restored = f'{name}-b'
        conn, gdir, last = self.start_and_protect(name, restored)
        prim = self.side(name, 'primary')
        last = self.talk(last, random.uniform(2, 4))
        # Still protected (else the kill below could only end the guest).
        self.assertEqual(State.PROTECTED, self.side(name, 'primary')['state'])
        # Output commit holds through libvirt's netdev, too.
        _, answered_in = self.kill_and_ask(prim['qemu_pid'], last, 90)
        sec = self.wait_active(name)
        # The guest runs on as a libvirt domain, and only there.
        rdom = conn.lookupByName(restored)
        self.assertEqual(libvirt.VIR_DOMAIN_RUNNING, rdom.state()[0])
        self.assertEqual(_qemu_pid(restored), sec['qemu_pid'])
        self.assertFalse(os.path.exists(f'/proc/{prim["qemu_pid"]}'))

        rserial = os.path.join(gdir, 'secondary', 'serial.log')
        base.wait_for(lambda: len(workload.serial_acks(
            workload.read_text(rserial))) >= 5, 30, what='ACKs after failover')
        operations.stop(self.state_dir, name)
        # Stopping the guest stops its domain (a transient domain is
        # undefined as it stops).
        base.wait_for(lambda: restored not in [
            d.name() for d in conn.listAllDomains(
                libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)], 10, 0.1,
            'the restored domain to stop')
        text = workload.read_text(rserial)
        self.assertNotIn('MFTVM-GUEST-READY', text)     # no reboot
        self.assertEqual([], workload.future_records(text))
        acks = workload.serial_acks(text)
        on_disk = workload.disk_records(
            [tuple(x) for x in sec['disk_layers']])
        last_record = records.verify_chain(on_disk)
        self.assertLessEqual(acks[-1][0], last_record)
        for seq, digest in acks:
            self.assertEqual(digest, on_disk[seq].hash.hex())
        print(f'libvirt failover: restore {sec["failover_ms"]} ms, kill -> '
              f'next answer {answered_in * 1000:.0f} ms')


    def test_direct_kernel_boot_fails_over_onto_the_files_shipped(self):
        # Nova boots a server from Glance's kernel and ramdisk, which it
        # writes to the primary's instance directory only. The secondary
        # gets copies over the data stream, and the domain resumes on
        # them after the primary's are gone.
        name = f'mftvm-lvk-{os.getpid()}'
        restored = f'{name}-b'
        nova_dir = os.path.join(self.tmp, 'nova-instance')
        conn, gdir, last = self.start_and_protect(name, restored,
                                                  boot_dir=nova_dir)
        prim = self.side(name, 'primary')
        boot_dir = os.path.join(gdir, 'secondary', 'boot')
        shipped = {}
        for role, theirs in (('kernel', 'kernel'), ('initrd', 'ramdisk')):
            ours = os.path.join(boot_dir, role)
            with open(ours, 'rb') as a, \
                    open(os.path.join(nova_dir, theirs), 'rb') as b:
                self.assertEqual(b.read(), a.read())
            self.assertEqual(0o600, os.stat(ours).st_mode & 0o777)
            shipped[role] = ours
        # Only the primary's host had them: gone with it.
        shutil.rmtree(nova_dir)
        last = self.talk(last, 1)
        last, _ = self.kill_and_ask(prim['qemu_pid'], last, 90)
        self.wait_active(name)
        xml = conn.lookupByName(restored).XMLDesc(0)
        os_el = ET.fromstring(xml).find('os')
        self.assertEqual(shipped['kernel'], os_el.findtext('kernel'))
        self.assertEqual(shipped['initrd'], os_el.findtext('initrd'))
        self.assertNotIn(nova_dir, xml)
        rserial = os.path.join(gdir, 'secondary', 'serial.log')
        self.talk(last, 1)
        self.assertNotIn('MFTVM-GUEST-READY', workload.read_text(rserial))

    def test_failed_over_domain_settles_into_nova_s_place(self):
        # After a failover Nova's stop, start and hard reboot need the
        # guest's disk at instances_path/<uuid>/disk and a persistent
        # domain: moved live, the guest running on without a break.
        import libvirt

        from mftvm_openstack.nova import settle

        name = f'mftvm-lvs-{os.getpid()}'
        restored = f'{name}-b'
        conn, gdir, last = self.start_and_protect(name, restored)
        prim = self.side(name, 'primary')
        last, _ = self.kill_and_ask(prim['qemu_pid'], last, 90)
        sec = self.wait_active(name)
        rdom = conn.lookupByName(restored)
        self.assertFalse(rdom.isPersistent())
        self.addCleanup(self._undefine, conn, restored)
        target = os.path.join(self.tmp, 'instances', 'uuid', 'disk')

        self.assertTrue(settle.into_place(rdom, target))
        self.assertTrue(rdom.isPersistent())
        self.assertEqual(target, settle.first_disk(rdom.XMLDesc(0))[1])
        defined = rdom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        self.assertEqual(target, settle.first_disk(defined)[1])
        self.assertNotIn('-incoming', defined)
        last = self.talk(last, 2)         # each answer the next one
        info = json.loads(subprocess.run(
            ['qemu-img', 'info', '-U', '--output=json', target],
            check=True, capture_output=True).stdout)
        self.assertEqual('qcow2', info['format'])
        self.assertNotIn('backing-filename', info)      # stands alone
        # the replica is nobody's disk any more
        qemu = sec['qemu_pid']
        open_files = {os.path.realpath(os.path.join(f'/proc/{qemu}/fd', fd))
                      for fd in os.listdir(f'/proc/{qemu}/fd')}
        self.assertIn(target, open_files)
        for layer, _ in sec['disk_layers']:
            self.assertNotIn(os.path.realpath(layer), open_files)
        self.assertFalse(settle.into_place(rdom, target))   # done already

        operations.stop(self.state_dir, name)
        base.wait_for(lambda: not rdom.isActive(), 10, 0.1,
                      'the settled domain to stop')
        # stopped, still defined, and what it wrote is on the new disk
        self.assertIn(restored, [d.name() for d in conn.listAllDomains()])
        raw = os.path.join(self.tmp, 'settled.raw')
        subprocess.run(['qemu-img', 'convert', '-O', 'raw', target, raw],
                       check=True)
        rserial = os.path.join(gdir, 'secondary', 'serial.log')
        on_disk = records.read_records(raw)
        records.verify_chain(on_disk)
        for seq, digest in workload.serial_acks(
                workload.read_text(rserial)):
            self.assertEqual(digest, on_disk[seq].hash.hex())

    def _undefine(self, conn, name):
        import libvirt
        try:
            conn.lookupByName(name).undefine()
        except libvirt.libvirtError:
            pass    # not defined

    def test_domain_dies_with_the_process_that_protects_it(self):
        # A host process killed alone must not leave libvirt's QEMU
        # running unfenced while the secondary takes over.
        name = f'mftvm-lvh-{os.getpid()}'
        restored = f'{name}-b'
        conn, gdir, last = self.start_and_protect(name, restored)
        prim = self.side(name, 'primary')
        os.kill(prim['host_pid'], signal.SIGKILL)
        base.wait_for(lambda: not os.path.exists(
            f'/proc/{prim["qemu_pid"]}'), 10, 0.05,
            "the domain's QEMU to die with its host process")
        after = base.wait_for(
            lambda: workload.counter_request('127.0.0.1', self.port, 5),
            90, 0, 'an answer from the restored domain')
        self.assertEqual(last + 1, after)
        sec = self.wait_active(name)
        self.assertEqual(_qemu_pid(restored), sec['qemu_pid'])


class HostilePrimaryTest(LibvirtTestCase):
    """A primary that is hostile, yet gets through (TLS off on a "trusted"
    replication network, or the pair's own primary host compromised),
    speaks: HELLO with a domain XML of its choosing, one checkpoint,
    PRIMARY_LOST. The secondary fails over and restores the
    guest as a libvirt domain, but only from what ft.domain_policy
    rebuilds: each hostile construct leaves it LOST, with no domain
    started and no file touched outside its instance directory."""

    def domains(self, conn):
        return {d.name() for d in conn.listAllDomains()}

    def start_secondary(self, name):
        """A secondary for libvirt guest ``name``, as a peer's agent would
        prepare it; returns its guest dir."""
        gdir = os.path.join(self.state_dir, name)
        os.makedirs(gdir)
        spec = vm.GuestSpec(name=name, domain=name, kernel=self.image.kernel,
                            initrd=self.image.initrd, memory_mib=64,
                            disk_size=1 << 20)
        with open(os.path.join(gdir, 'guest.json'), 'w') as f:
            json.dump({'spec': spec.to_dict(), 'options': {
                **dataclasses.asdict(operations.ProtectOptions()),
                'libvirt_uri': URI, 'fence_acquire_timeout': 2.0,
                # the domain policy alone must hold
                'tls': False}}, f)
        log = open(os.path.join(gdir, 'secondary-host.log'), 'ab')
        with log:
            proc = subprocess.Popen(
                [sys.executable, '-m', 'mftvm_openstack.instance',
                 'secondary', gdir], stdin=subprocess.DEVNULL, stdout=log,
                stderr=log, start_new_session=True)
        self.addCleanup(self._end, proc)
        base.wait_for(lambda: (client.read_status(gdir, 'secondary') or {})
                      .get('state') == 'waiting-for-primary', 30, 0.1,
                      'the secondary to listen')
        return gdir

    def _end(self, proc):
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    async def pose_as_primary(self, gdir, domain_xml):
        sock = os.path.join(gdir, 'secondary', 'data.sock')
        chan = await transport.Channel.connect(
            transport.DataAddress(path=sock))
        try:
            await chan.send_json(transport.Kind.HELLO, Hello(
                version=PROTOCOL_VERSION, qemu_pid=1, host_pid=1,
                boot_id='another-machine', pair_id='pair-x',
                disk_size=1 << 20, domain_xml=domain_xml).to_dict())
            ready = await chan.recv(30)
            self.assertEqual(transport.Kind.READY, ready.kind,
                             ready.payload)
            await chan.send(transport.Kind.MARK, 1)
            self.assertEqual(transport.Kind.MARKED, (await chan.recv(30))
                             .kind)
            delta = trackers.RamDelta(np.zeros(0, np.uint32),
                                      np.zeros((0, 4096), np.uint8))
            await chan.send(transport.Kind.CHECKPOINT, 1,
                            *transport.encode_checkpoint(b'devstate',
                                                         delta))
            self.assertEqual(transport.Kind.ACK, (await chan.recv(30)).kind)
            await chan.send_json(transport.Kind.PRIMARY_LOST,
                                 {'reason': 'so I say'}, epoch=1)
        finally:
            chan.close()

    def assert_refused(self, name, domain_xml, where, victim):
        import libvirt
        conn = libvirt.open(URI)
        self.addCleanup(conn.close)
        before = self.domains(conn)
        gdir = self.start_secondary(name)
        asyncio.run(self.pose_as_primary(gdir, domain_xml))
        st = base.wait_for(
            lambda: (s := client.read_status(gdir, 'secondary') or {})
            .get('state') in ('lost', 'active', 'stopped') and s, 60, 0.1,
            'the secondary to fail over')
        self.addDetail('secondary', content.text_content(json.dumps(st)))
        self.assertEqual('lost', st['state'])
        # nothing created outside the instance's dir, nothing started
        if victim is not None:
            self.assertFalse(os.path.exists(victim), victim)
        self.assertEqual(before, self.domains(conn))
        self.assertNotIn(name, self.domains(conn))
        # ...because the policy refused it, saying where
        self.assertIn(where, st.get('error') or st.get('reason') or '')

    def hostile(self, name, device='', tail=''):
        spec = vm.GuestSpec(name=name, kernel=self.image.kernel,
                            initrd=self.image.initrd, disk='/nonexistent',
                            memory_mib=64)
        xml = libvirt_domain.domain_xml(spec, '/var/tmp/x.log')
        return xml.replace('</devices>', f'{device}</devices>').replace(
            '</domain>', f'{tail}</domain>')

    def test_char_device_onto_a_host_file_is_refused(self):
        victim = os.path.join(self.tmp, 'victim-parallel')
        self.assert_refused(
            f'mftvm-hostile-{os.getpid()}', self.hostile(
                'x', device=f'<parallel type="file"><source path='
                            f'"{victim}"/></parallel>'),
            'domain/devices/parallel', victim)

    def test_qemu_commandline_is_refused(self):
        victim = os.path.join(self.tmp, 'victim-mem')
        self.assert_refused(
            f'mftvm-hostile-{os.getpid()}', self.hostile(
                'x', tail=f'<qemu:commandline><qemu:arg value="-object"/>'
                          f'<qemu:arg value="memory-backend-file,id=evil,'
                          f'size=1M,share=on,mem-path={victim}"/>'
                          f'</qemu:commandline>'),
            'domain/qemu:commandline/qemu:arg', victim)

    def test_second_disk_on_a_host_file_is_refused(self):
        victim = os.path.join(self.tmp, 'victim-disk')
        with open(victim, 'wb') as f:
            f.truncate(1 << 20)
        before = os.stat(victim)
        self.assert_refused(
            f'mftvm-hostile-{os.getpid()}', self.hostile(
                'x', device=f'<disk type="file" device="disk"><driver '
                            f'name="qemu" type="raw"/><source file='
                            f'"{victim}"/><target dev="vdb" bus="virtio"/>'
                            f'</disk>'),
            'domain/devices/disk', victim=None)
        after = os.stat(victim)
        self.assertEqual((before.st_mtime_ns, before.st_size),
                         (after.st_mtime_ns, after.st_size))
