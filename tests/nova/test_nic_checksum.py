"""``[ft] nic_checksum_offload``: the guest's virtio NIC in the domain XML.

With the option false, FTLibvirtDriver writes ``<driver><host
csum='off'/></driver>`` into the guest's virtio interface (OVS's
userspace datapath cannot finish the guest's partial checksums across a
Geneve tunnel: doc/cloud-lab.rst); by default it leaves Nova's XML as it
is. Read from the domain XML the driver gives libvirt to define (Nova's
fake libvirt keeps no ``<driver>`` of an interface in its own XMLDesc).
"""

from __future__ import annotations

from typing import Any

import fixtures
from lxml import etree
from nova.tests.fixtures import libvirt as fakelibvirt

from tests.nova.test_driver import FTDriverTestBase


class TestNICChecksum(FTDriverTestBase):

    def setUp(self) -> None:
        super().setUp()
        #: domain uuid -> the XML last defined for it
        self.defined: dict[str, str] = {}
        define = fakelibvirt.Connection.defineXML

        def defineXML(conn: Any, xml: str) -> Any:
            dom = define(conn, xml)
            self.defined[dom.UUIDString()] = xml
            return dom
        self.useFixture(fixtures.MonkeyPatch(
            'nova.tests.fixtures.libvirt.Connection.defineXML', defineXML))

    def _interface(self, metadata: dict[str, str]) -> etree._Element:
        """The virtio interface of a server booted with ``metadata`` on
        the harness' one port (the server deleted, the port free again).
        """
        port = self.neutron.port_1['id']
        body = self._build_server(flavor_id=self.flavor,
                                  networks=[{'port': port}])
        body['metadata'] = metadata
        server = self._wait_for_state_change(
            self.api.post_server({'server': body}), 'ACTIVE')
        xml = self.defined[server['id']]
        self._delete_server(server)
        (interface,) = etree.fromstring(xml).findall('./devices/interface')
        self.assertEqual('virtio', interface.find('model').get('type'))
        return interface

    def test_off_for_every_guest_when_the_option_says_so(self) -> None:
        self.flags(nic_checksum_offload=False, group='ft')
        for metadata in ({'ft': 'true'}, {}):
            interface = self._interface(metadata)
            self.assertEqual(['off'], [
                h.get('csum') for h in interface.findall('./driver/host')],
                metadata)
            # Nova's own driver attributes stay beside it
            self.assertEqual(etree.tostring(interface).count(b'<driver'), 1)

    def test_left_to_the_host_by_default(self) -> None:
        interface = self._interface({'ft': 'true'})
        self.assertEqual([], interface.findall('./driver/host'))
