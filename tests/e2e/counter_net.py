"""A tenant network for the project's counter guest, made through the CLI.

The e2e tests that talk to a guest (a plain server across OVN, an FT
server through a host's power-off, the power-off benchmark) each need
the same things: a Geneve network and subnet, a security group opening
the counter's port, the guest's port at :data:`GUEST_IP`, a probe port
for a host to talk from, and the guest image that runs the counter with
its virtio-net checksum offload off (OVS's userspace Geneve needs that).
:func:`make` makes them under one name, each deleted after the test::

    net = counter_net.make(self, self.unique('e2e'))
    server = self.server(name, '--image', net.image['id'], ...,
                         '--nic', f'port-id={net.port["id"]}')
    self.probe('h2', net.probe['id'])        # h2 talks to the guest
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: the guest's static address (its init's), and its counter's port
GUEST_IP = '10.0.2.15'
COUNTER_PORT = 7000
#: the kernel command line of the counter guest's image
COUNTER_CMDLINE = ('os_command_line=console=ttyS0 mftvm.run=counter '
                   'virtio_net.csum=0')


@dataclass(frozen=True)
class CounterNet:
    """What :func:`make` made (each as ``openstack ... -f json`` shows
    it)."""

    network: dict[str, Any]
    #: the guest's port, at GUEST_IP, in a group that opens COUNTER_PORT
    port: dict[str, Any]
    #: a port of the same network to plug into a host (LabTestCase.probe)
    probe: dict[str, Any]
    #: the counter guest's disk image (kernel and ramdisk named by it)
    image: dict[str, Any]


def make(case: Any, name: str) -> CounterNet:
    """The network, ports and image for a counter guest, named after
    ``name``, deleted after ``case`` (a
    :class:`~tests.e2e.lab.LabTestCase`)."""
    _, _, image, _ = case.upload_guest(f'{name}-counter', COUNTER_CMDLINE)
    network = case.openstack_json('network', 'create', f'{name}-net')
    case.addCleanup(case.openstack, 'network', 'delete', network['id'],
                    check=False)
    case.openstack('subnet', 'create', '--network', network['id'],
                   '--subnet-range', '10.0.2.0/24', '--gateway', '10.0.2.2',
                   f'{name}-subnet')
    group = case.openstack_json('security', 'group', 'create',
                                f'{name}-counter')
    case.addCleanup(case.openstack, 'security', 'group', 'delete',
                    group['id'], check=False)
    case.openstack('security', 'group', 'rule', 'create', '--protocol',
                   'tcp', '--dst-port', str(COUNTER_PORT), group['id'])
    port = case.openstack_json(
        'port', 'create', '--network', network['id'], '--fixed-ip',
        f'subnet={name}-subnet,ip-address={GUEST_IP}',
        '--security-group', group['id'], f'{name}-guest')
    case.addCleanup(case.openstack, 'port', 'delete', port['id'],
                    check=False)
    probe = case.openstack_json('port', 'create', '--network',
                                network['id'], f'{name}-probe')
    case.addCleanup(case.openstack, 'port', 'delete', probe['id'],
                    check=False)
    return CounterNet(network=network, port=port, probe=probe, image=image)
