"""A guest with two disks and two NICs loses its primary.

The guest writes a hash chain to each disk (``writer`` on /dev/vda,
``writer2`` on /dev/vdb) and answers its counter on both NICs (each on
its own user-mode network, each with its own port forward). The primary
QEMU is killed; the secondary must resume with both disks at the
committed epoch (both chains intact, no record from after it) and both
NICs answering, none with an answer a failover took back.
"""

import os
import random

from mftvm_openstack.contract.states import State
from mftvm_openstack.images import workload
from mftvm_openstack.local import demo, operations
from tests.functional import base


class TwoDisksTwoNicsTest(base.GuestTestCase):

    def protect_two(self, name):
        self.port2 = demo.free_port()
        disks = [self.make_disk(), self.make_disk()]
        spec = operations.make_spec(
            name, self.image.kernel, self.image.initrd, disks[0],
            append='console=ttyS0 quiet mftvm.run=writer,writer2,counter '
                   'mftvm.writer_interval_ms=20',
            nic=f'user,hostfwd=tcp:127.0.0.1:{self.port}-:7000',
            more_disks=[disks[1]],
            more_nics=[f'user,hostfwd=tcp:127.0.0.1:{self.port2}-:7000'])
        self.addCleanup(self._stop_guest, name)
        gdir = operations.protect(spec, operations.ProtectOptions(),
                                  self.state_dir)
        return spec, gdir

    def ask(self, port, timeout=2):
        return workload.counter_request('127.0.0.1', port, timeout)

    def talk_both(self, last, seconds):
        """Ask the counter on each NIC in turn; each answer is last + 1."""
        deadline = base.time.monotonic() + seconds
        while base.time.monotonic() < deadline:
            for port in (self.port, self.port2):
                got = self.ask(port)
                if got is not None:
                    self.assertEqual(last + 1, got, f'port {port}')
                    last = got
        return last

    def test_both_disks_and_both_nics_survive_a_primary_kill(self):
        spec, gdir = self.protect_two('md')
        self.assertEqual(2, len(spec.all_disks))
        last = self.wait_counter(gdir)
        # The second NIC answers too (its own network, the same counter).
        last = self.talk_both(last, random.uniform(3, 5))
        prim = self.side('md', 'primary')
        self.assertEqual(State.PROTECTED, prim['state'])
        # Output commit on both NICs: the first answer after the kill, on
        # the second NIC, is exactly the next value (an answer let out
        # before its commit would be repeated).
        base.time.sleep(random.uniform(0, 0.2))
        os.kill(prim['qemu_pid'], base.signal.SIGKILL)
        after = base.wait_for(lambda: self.ask(self.port2, 5), 60, 0,
                              'an answer on the second NIC')
        self.assertEqual(last + 1, after)
        self.assertEqual(last + 2, base.wait_for(
            lambda: self.ask(self.port, 5), 30, 0,
            'an answer on the first NIC'))
        sec = self.wait_active('md')
        self.assertEqual([sec['qemu_pid']], base.qemu_pids_for('md'))
        self.assertEqual(1, len(sec['more_disk_layers']))

        serial = os.path.join(gdir, 'secondary', 'serial.log')
        base.wait_for(lambda: all(
            len(workload.serial_acks(workload.read_text(serial), tag)) >= 5
            for tag in ('', workload.SECOND_WRITER)), 30,
            what='ACKs of both writers after failover')
        operations.stop(self.state_dir, 'md')
        text = workload.read_text(serial)
        self.assertNotIn('MFTVM-GUEST-READY', text)      # no reboot
        for tag, layers in (('', sec['disk_layers']),
                            (workload.SECOND_WRITER,
                             sec['more_disk_layers'][0])):
            # No record from after the committed epoch on either disk,
            # each chain intact, and the writer's ACKs continue it.
            base.assert_acks_continue_chain(self, text, layers, tag)
        # The two disks are two replicas, not one twice.
        self.assertNotEqual(sec['disk_layers'][0][0],
                            sec['more_disk_layers'][0][0][0])
