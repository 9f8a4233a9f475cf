"""Cinder volumes on the lab's Ceph, through the ``openstack`` CLI only.

One lab for the class, brought up with ``cloudlab.py up --with-cinder``
(a single-node Ceph and Cinder's RBD driver, tools/cloud/storage.py) and
one compute host.  The guest's own writes are the evidence: booted from
a volume, it writes hash-chained records to it (``mftvm.run=writer``)
and, once a second volume is attached, a fixed number of them to that
one (``writer-on:vdb:N``); the test reads both volumes back from Ceph
(``rbd export`` in the lab's namespace) after Nova let go of them::

    openstack volume create --image mftvm-guest --size 1 boot
    openstack server create --volume boot ... vm
    openstack server add volume vm data      # the guest writes to vdb
    openstack server remove volume vm data   # data: N records, intact

The fixture borrows test_cloud.CloudTest's helpers (the same lab
start-up, CLI wrappers and guest upload) without its tests, so that it
moves with them to a shared lab.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys

import testtools

from mftvm_openstack.contract.volume import SharedDisk
from mftvm_openstack.fencing.ceph import CephBlocklist
from mftvm_openstack.ft import disk, shared_image, volume
from mftvm_openstack.images import records, workload
from tests.e2e import lab
from tests.e2e.lab import checked as _checked
from tests.functional import base, test_shared_volume

#: the host the servers run on (FTLibvirtDriver, RBD volumes configured)
HOST = 'h1'
#: records the guest writes to the attached volume
DATA_RECORDS = 64
#: how long a volume or a server may take to settle, seconds
SETTLE = 300
GUEST_CMDLINE = ('console=ttyS0 virtio_net.csum=0 '
                 f'mftvm.run=writer,writer-on:vdb:{DATA_RECORDS}')
ACK_RE = re.compile(r'^ACK (\d+) ([0-9a-f]{64})', re.M)


class VolumesCloudTest(lab.LabTestCase):
    """Boot from a Cinder volume, attach, detach and delete, on RBD (the
    tier's shared lab runs Ceph and Cinder: ``up --with-cinder``)."""

    # -- helpers --------------------------------------------------------

    def wait_for(self, what: str, predicate, timeout: float = SETTLE):
        # (every 2 s: each look is an openstack CLI call)
        return base.wait_for(predicate, timeout, 2, what)

    def volume(self, volume_id: str) -> dict:
        return self.cloud_json('volume', 'show', volume_id)

    def wait_volume(self, volume_id: str, status: str) -> dict:
        def settled():
            shown = self.volume(volume_id)
            if shown['status'] in ('error', 'error_deleting'):
                self.fail(f'volume {volume_id} went {shown["status"]}')
            return shown if shown['status'] == status else None
        return self.wait_for(f'volume {volume_id} {status}', settled)

    def create_volume(self, name: str, *args: str) -> dict:
        volume = self.cloud_json('volume', 'create', '--size', '1', *args,
                                 name)
        self.addCleanup(self.cloud, 'volume', 'delete', volume['id'],
                        check=False)
        return self.wait_volume(volume['id'], 'available')

    def console(self, server_id: str) -> str:
        return self.cloud('console', 'log', 'show', server_id).stdout

    def read_volume(self, volume_id: str) -> bytes:
        """The volume's bytes as Ceph holds them (``rbd export`` as the
        lab's admin, in its namespace)."""
        out = os.path.join(self.tmp, f'{volume_id}.raw')
        _checked(['ip', 'netns', 'exec', f'mfc-{self.lab.name}', 'rbd',
                  '-c', os.path.join(self.lab_dir, 'ceph', 'ceph.conf'),
                  '--id', 'admin', 'export', f'volumes/volume-{volume_id}',
                  out])
        self.addCleanup(os.unlink, out)
        with open(out, 'rb') as f:
            return f.read()

    def attached_to(self, volume: dict) -> list[tuple[str, str]]:
        """(server, host) of each of ``volume``'s attachments."""
        return [(a['server_id'], a['host_name'])
                for a in volume['attachments']]

    # -- tests -----------------------------------------------------------

    def test_volume_service_on_rbd(self):
        services = {(s['Binary'], s['Host'], s['State'])
                    for s in self.cloud_json('volume', 'service', 'list')}
        self.assertIn('up', {state for binary, _, state in services
                             if binary == 'cinder-volume'})
        (volume_host,) = [host for binary, host, _ in services
                          if binary == 'cinder-volume']
        self.assertTrue(volume_host.endswith('@ceph'), volume_host)
        volume = self.create_volume(self.unique('e2e-plain'))
        # Cinder's RBD driver made it in the lab's pool, on Ceph.
        self.assertEqual(1 << 30, len(self.read_volume(volume['id'])))

    def test_boot_from_volume_attach_write_detach_delete(self):
        self.add_hosts(HOST)
        _, _, image, _ = self.upload_guest(
            self.unique('e2e-volume-guest'),
            f'os_command_line={GUEST_CMDLINE}')
        boot = self.create_volume(self.unique('e2e-boot'), '--image',
                                  image['id'], '--bootable')
        data = self.create_volume(self.unique('e2e-data'))
        flavor = self.unique('m1.e2e-volume')
        self.cloud('flavor', 'create', '--ram', '128', '--disk', '0',
                   '--vcpus', '1', flavor)
        self.addCleanup(self.cloud, 'flavor', 'delete', flavor,
                        check=False)

        server = self.cloud_json(
            'server', 'create', '--volume', boot['id'], '--flavor',
            flavor, '--nic', 'none', '--availability-zone',
            f'nova:{HOST}', '--wait', self.unique('e2e-volume-vm'))
        self.addCleanup(self.cloud, 'server', 'delete', '--wait',
                        server['id'], check=False)
        shown = self.cloud_json('server', 'show', server['id'])
        self.assertEqual(('ACTIVE', HOST), (
            shown['status'], shown['OS-EXT-SRV-ATTR:host']))
        self.assertEqual([{'id': boot['id']}], [
            {'id': v['id']} for v in shown['volumes_attached']])
        self.assertEqual([(server['id'], HOST)],
                         self.attached_to(self.volume(boot['id'])))
        # The guest writes its records to the boot volume (/dev/vda).
        self.wait_for('the guest\'s writer on its boot volume', lambda:
                      len(ACK_RE.findall(self.console(server['id']))) > 5)

        # A second volume, attached to the running server: in use on
        # the server's host; the guest writes its N records to it.
        self.cloud('server', 'add', 'volume', server['id'], data['id'])
        attached = self.wait_volume(data['id'], 'in-use')
        self.assertEqual([(server['id'], HOST)], self.attached_to(attached))
        self.assertEqual('/dev/vdb', attached['attachments'][0]['device'])
        self.wait_for('the guest\'s writer on the attached volume', lambda:
                      f'WRITER-DONE vdb {DATA_RECORDS}' in
                      self.console(server['id']))
        self.cloud('server', 'remove', 'volume', server['id'], data['id'])
        detached = self.wait_volume(data['id'], 'available')
        self.assertEqual([], detached['attachments'])
        written = records.parse_records(self.read_volume(data['id']))
        self.assertEqual(DATA_RECORDS - 1, records.verify_chain(written))

        # Deleting the server leaves the boot volume (made before the
        # server: not deleted on termination) available, with every
        # record the guest acknowledged before, intact.
        acked = workload.serial_acks(self.console(server['id']))
        self.assertTrue(acked)
        self.cloud('server', 'delete', '--wait', server['id'])
        kept = self.wait_volume(boot['id'], 'available')
        self.assertEqual([], kept['attachments'])
        on_disk = records.parse_records(self.read_volume(boot['id']))
        last = records.verify_chain(on_disk)
        last_acked, last_hash = acked[-1]
        self.assertGreaterEqual(last, last_acked)
        self.assertEqual(last_hash, on_disk[last_acked].hash.hex())

    def test_ft_flavor_server_from_volume_refused(self):
        # Today FT protects a local root disk only (nova/protectable.py):
        # an FT flavor booted from a volume is refused at spawn, with a
        # fault that says why, and the volume is let go.
        self.add_hosts(HOST)
        _, _, image, _ = self.upload_guest(
            self.unique('e2e-ft-volume-guest'),
            'os_command_line=console=ttyS0')
        boot = self.create_volume(self.unique('e2e-ft-boot'), '--image',
                                  image['id'], '--bootable')
        flavor = self.unique('m1.e2e-ft-volume')
        self.cloud('flavor', 'create', '--ram', '128', '--disk', '0',
                   '--vcpus', '1', '--property', 'ft:enabled=true',
                   flavor, microversion=lab.VALIDATED)
        self.addCleanup(self.cloud, 'flavor', 'delete', flavor,
                        check=False)
        server = self.cloud_json(
            'server', 'create', '--volume', boot['id'], '--flavor',
            flavor, '--nic', 'none', '--availability-zone',
            f'nova:{HOST}', self.unique('e2e-ft-volume-vm'))
        self.addCleanup(self.cloud, 'server', 'delete', '--wait',
                        server['id'], check=False)

        def ended():
            shown = self.cloud_json('server', 'show', server['id'])
            return shown if shown['status'] in ('ERROR', 'ACTIVE') else None

        shown = ended() or self.wait_for('the build to end', ended)
        self.assertEqual('ERROR', shown['status'])
        self.assertIn('fault tolerance cannot protect boot from volume',
                      json.dumps(shown.get('fault')))
        # Nothing runs on the host for it (other tests' servers may), and
        # Cinder has it back.
        with open(os.path.join(self.lab_dir, 'lab.json')) as f:
            enter = json.load(f)['hosts'][HOST]['enter']
        self.assertNotIn(shown['OS-EXT-SRV-ATTR:instance_name'], _checked(
            [*enter, 'virsh', '-c', 'qemu:///system', 'list', '--all',
             '--name']).stdout.split())
        self.cloud('server', 'delete', '--wait', server['id'])
        self.assertEqual([], self.wait_volume(boot['id'],
                                              'available')['attachments'])


class SharedVolumeOnRbdTest(lab.LabTestCase,
                            test_shared_volume.SharedVolumeTest):
    """The engine's shared-volume pair (doc/volumes.rst, design (a)) on
    a Cinder volume of the lab's Ceph: the volume made with the
    ``openstack`` CLI, the guest's QEMU (the primary) buffering its
    writes over the RBD image, the secondary's qemu-storage-daemon
    building its epoch store on the same image with its own librbd
    client; the image read back through Ceph holds committed epochs
    only, and a client Ceph has blocklisted can never write it again.
    (The same tests as tests/functional/test_shared_volume, on RBD; a
    volume-backed *server* protected through Nova needs the instance
    process to use these pieces: doc/volumes.rst.)"""

    SIZE = 1 << 30

    def run_async(self, coro, timeout=120):
        # (Ceph on this machine answers slower than a local file)
        return super().run_async(coro, timeout)

    def make_shared(self):
        volume = self.cloud_json('volume', 'create', '--size', '1',
                                 self.unique('e2e-shared'))
        self.addCleanup(self.cloud, 'volume', 'delete', volume['id'],
                        check=False)
        base.wait_for(lambda: self.cloud_json(
            'volume', 'show', volume['id'])['status'] == 'available',
            SETTLE, 2, f'volume {volume["id"]} available')
        keyring = os.path.join(self.lab_dir, 'ceph',
                               'ceph.client.cinder.keyring')
        with open(keyring) as f:
            key = re.search(r'key\s*=\s*(\S+)', f.read()).group(1)
        self.key_file = os.path.join(self.tmp, 'cinder.key')
        with open(os.open(self.key_file, os.O_WRONLY | os.O_CREAT, 0o600),
                  'w') as f:
            f.write(key)
        shared = SharedDisk.from_dict({
            'driver': 'rbd', 'pool': 'volumes',
            'image': f'volume-{volume["id"]}',
            'monitors': [{'host': self.lab.ip, 'port': 6789}],
            'user': 'cinder', 'key_file': self.key_file})
        self.qemu_io(shared, 'write -P 0x11 0 64k')   # its data before
        return shared

    def secret(self):
        return ['--object',
                f'secret,id=k0,file={self.key_file},format=base64']

    def qemu_io(self, shared, command):
        _checked(['qemu-io', *self.secret(), '-c', command,
                  '--image-opts', self.image_opts(shared)])

    @staticmethod
    def image_opts(shared):
        """The image as ``--image-opts`` (what shared_image opens)."""
        node = shared_image.base_blockdev(shared, 'n', 'k0')['file']
        server = node['server'][0]
        return (f'driver=raw,file.driver=rbd,file.pool={node["pool"]},'
                f'file.image={node["image"]},file.user={node["user"]},'
                f'file.key-secret=k0,file.auth-client-required.0=cephx,'
                f'file.server.0.host={server["host"]},'
                f'file.server.0.port={server["port"]}')

    def image(self):
        """The image's first 8 MiB, as Ceph holds them."""
        out = os.path.join(self.tmp, 'image.raw')
        with contextlib.suppress(FileNotFoundError):
            os.unlink(out)
        _checked(['qemu-img', 'dd', *self.secret(), '--image-opts', '-O',
                  'raw', 'bs=1M', 'count=8',
                  f'if={self.image_opts(self.shared)}', f'of={out}'])
        with open(out, 'rb') as f:
            return f.read()

    def read_layers(self, layers):
        return test_shared_volume.read_layers(
            layers, self.shared, self.key_file)[:8 << 20]

    def test_a_blocklisted_primary_can_never_write_the_image(self):
        self.run_async(self._blocklisted())

    async def _blocklisted(self):
        shared = self.shared
        fence = CephBlocklist(
            shared.pool, shared.image, user=shared.user,
            keyfile=self.key_file,
            monitors=[f'{m.host}:{m.port}' for m in shared.monitors])
        guest = test_shared_volume.SharedGuest(self.tmp, shared)
        store = disk.EpochOverlayStore(self.store_dir, self.SIZE,
                                       shared=shared, merge_at=1)
        try:
            await guest.start()
            primary = await asyncio.to_thread(fence.watchers)
            self.assertEqual(1, len(primary))
            target = await store.start()
            ours = await asyncio.to_thread(fence.watchers) - primary
            self.assertEqual(1, len(ours))
            buffer = volume.VolumeBuffer(guest.monitor, 'disk0',
                                         os.path.join(self.tmp, 'buf'),
                                         self.SIZE)
            sync = disk.AsyncReplication(guest.monitor,
                                         await buffer.insulate())
            sync.initial_sync = 'top'
            await sync.start(target)
            await guest.write(0xa1, 1 << 20)              # epoch 1
            await sync.checkpoint(1)
            await store.mark(1)
            await store.commit(1)
            # the secondary takes over: the primary's client fenced
            fenced = await asyncio.to_thread(fence.fence_others, ours)
            self.assertEqual(sorted(primary), fenced)
            await store.failover_layers(1)
            await sync.stop()
            # the fenced primary's merge into the image fails: nothing
            # of it reaches the image
            await guest.write(0xee, 2 << 20)
            with testtools.ExpectedException(disk.DiskError):
                await buffer.release()
        finally:
            await store.stop()
            await guest.close()
        self.assertFalse(test_shared_volume.expect(self.image(), 2 << 20,
                                                   0xee))


if __name__ == '__main__':
    sys.exit('run with stestr: tests/e2e needs .cloud-venv and root')
