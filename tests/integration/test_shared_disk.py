"""A guest whose disk is on storage every host reaches (doc/volumes.rst,
"The instance process"), protected by the agents: an image file in the
lab's directory, which every host's namespace sees at one path, stands
in for an RBD volume.

Its primary host dies twice (h1, then h2 after the agent re-protected
the guest onto h3): each time the guest resumes on the image itself,
and the writer's hash chain, read from the image alone once the guest
stopped, is intact, holds nothing of an uncommitted epoch, and holds
every record the guest acknowledged.
"""

from __future__ import annotations

import os

from mftvm_openstack.images import records, workload
from mftvm_openstack.local import demo
from tests.functional import base
from tests.integration.test_agent_failover import AgentLab


class SharedDiskHostLossTest(AgentLab):

    def serial(self, host: str) -> str:
        return workload.read_text(os.path.join(
            self.instance_dir(host), 'secondary', 'serial.log'))

    def assert_on_the_image(self, host: str) -> None:
        """The guest on ``host`` runs on the image itself, once the
        committed overlays it was restored on are merged into it."""
        layers = base.wait_for(
            lambda: len(ls := self.status(host).get('disk_layers') or [])
            == 1 and ls, 30, 0.2, f'the guest on {host} on the image')
        self.assertIn(f'"filename": "{self.disk}"', layers[0][0])

    def test_host_loss_twice_the_guest_runs_on_the_shared_image(self):
        port = demo.free_port()
        last = self.protect(port, shared=True)
        st = self.status('h1')
        self.assertEqual(('protected', 'h2'), (st['state'], st['peer']))
        last = self.talk('h1', port, last, 2)

        last, _ = self.fail_over('h1', 'h2', port, last)
        self.assert_on_the_image('h2')
        # Re-protected from h2 onto h3, with only h2's buffer to send.
        base.wait_for(
            lambda: (s := self.status('h2')).get('state') == 'protected'
            and s.get('peer') == 'h3'
            and s.get('last_committed_epoch', 0) >= 1, 120, 0.5,
            'the guest to be re-protected from h2')
        last = self.talk('h2', port, last, 2)

        last, _ = self.fail_over('h2', 'h3', port, last)
        self.assert_on_the_image('h3')
        base.wait_for(lambda: len(workload.serial_acks(
            self.serial('h3'))) >= 5, 30, 0.2, 'ACKs on h3')
        # (read before the stop, which takes the instance's directory)
        serials = {host: self.serial(host) for host in ('h2', 'h3')}
        self.api.stop_instance({}, 'h3', self.name)
        base.wait_for(lambda: not self.qemu_pids(), 30, 0.2,
                      'the guest stopped')

        for host, text in serials.items():
            # No resumed writer found a slot of its future written.
            self.assertEqual([], workload.future_records(text), host)
        on_image = workload.disk_records([(self.disk, 'raw')])
        last_record = records.verify_chain(on_image)
        acks = workload.serial_acks(serials['h3'])
        self.assertTrue(acks)
        self.assertLessEqual(acks[-1][0], last_record)
        for seq, digest in acks:
            self.assertEqual(digest, on_image[seq].hash.hex())
