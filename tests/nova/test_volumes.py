"""Cinder RBD volumes of FT servers in Nova's harness (doc/volumes.rst).

``[ft] rbd_volumes`` on, Cinder's fixture answering RBD connection_info.
Through the real API on fake-libvirt computes running FTLibvirtDriver,
agents faked (:class:`~tests.nova.test_handoff.TakeoverAgentAPI`):

* an FT-flavor server booted from an RBD volume, with an RBD data
  volume, is protected (not refused);
* while the secondary's host stands by, its nova-compute makes its own
  attachment of each volume with its connector (Cinder still shows the
  volume on the primary's host: the attachment is not completed);
* when that host takes the server over, each volume's attachment moves
  there: its attachment completed, the old host's deleted, the block
  device mapping pointing at the new one;
* protection ending without a failover (the server deleted) deletes
  the standby attachments;
* a volume on another backend is refused, its backend named;
* detaching a volume from a protected server is refused (the volume
  stays attached, the reason is the instance fault); attaching one stays
  refused, as with the option off (tests/nova/test_refusals.py).
"""

from __future__ import annotations

import json
import time
from typing import Any

import fixtures
import nova.context as nova_context
import nova.objects.block_device as bdm_obj
from nova.tests import fixtures as nova_fixtures
from nova.tests.functional.api import client as api_client

from mftvm_openstack.nova import driver, protectable, volumes
from tests.nova import test_handoff, test_refusals

CINDER = nova_fixtures.CinderFixture
DATA_VOLUME = test_refusals.DATA_VOLUME
RBD_INFO = {'driver_volume_type': 'rbd', 'data': {
    'name': 'volumes/volume-1', 'hosts': ['10.78.1.1'], 'ports': ['6789'],
    'cluster_name': 'ceph', 'auth_enabled': False}}
TIMEOUT = test_handoff.HANDOFF_TIMEOUT


class RbdVolumeTestBase(test_handoff.HandoffTestBase,
                        test_refusals.RefusalTestBase):

    def setUp(self) -> None:
        self.useFixture(fixtures.MonkeyPatch(
            'nova.tests.fixtures.cinder.CinderFixture.'
            'VOLUME_CONNECTION_INFO',
            dict(CINDER.VOLUME_CONNECTION_INFO, fake=RBD_INFO)))
        super().setUp()
        self.flags(rbd_volumes=True, group='ft')

    def _boot_bfv(self) -> dict:
        body = dict(self._bfv())
        body['block_device_mapping_v2'] = body[
            'block_device_mapping_v2'] + [{
                'boot_index': -1, 'uuid': DATA_VOLUME,
                'source_type': 'volume', 'destination_type': 'volume'}]
        return self._boot_ft(**body)

    def _attachments(self, volume_id: str) -> dict[str, str]:
        """attachment id -> its connector's host (None: not connected)."""
        return {a['id']: (a['connector'] or {}).get('host')
                for a in self.cinder.volume_to_attachment[volume_id]
                .values()}

    def _bdms(self, server: dict) -> dict[str, Any]:
        ctxt = nova_context.get_admin_context()
        return {b.volume_id: b for b in
                bdm_obj.BlockDeviceMappingList.get_by_instance_uuid(
                    ctxt, server['id']) if b.is_volume}

    def _stand_by(self, server: dict, host: str, primary: str) -> None:
        self.takeover.running[host] = [
            {'instance': server['id'], 'role': 'secondary',
             'state': 'standby', 'alive': True, 'host': host,
             'peer': primary}]

    def _wait_standby(self, server: dict, count: int) -> dict:
        deadline = time.monotonic() + TIMEOUT
        while True:
            sysmeta = self._sysmeta(self.api.get_server(server['id']))
            standby = {k: v for k, v in sysmeta.items()
                       if k.startswith(volumes.STANDBY_PREFIX)}
            if len(standby) >= count:
                return standby
            self.assertLess(time.monotonic(), deadline, sysmeta)
            time.sleep(0.05)


class TestRbdVolumes(RbdVolumeTestBase):

    def test_volumes_stand_by_then_move_with_the_takeover(self) -> None:
        server = self._boot_bfv()
        primary, secondary, _ = self._roles(server)
        self.assertEqual('protected',
                         self._sysmeta(server)[driver.STATUS])
        self.assertEqual([primary], [h for h, _ in self.agent.of('protect')])
        old = {v: b.attachment_id for v, b in self._bdms(server).items()}
        self.assertEqual({CINDER.IMAGE_BACKED_VOL, DATA_VOLUME}, set(old))

        self._stand_by(server, secondary, primary)
        standby = self._wait_standby(server, 2)
        for volume_id, attachment_id in old.items():
            made = standby[volumes.standby_key(volume_id)]
            # the secondary's own attachment, beside the primary's (whose
            # connector's host is the harness' one CONF.host)
            found = self._attachments(volume_id)
            self.assertEqual({attachment_id, made}, set(found))
            self.assertEqual(secondary, found[made])
        # once, not at every look
        time.sleep(0.5)
        self.assertEqual(standby, self._wait_standby(server, 2))

        self.takeover.running[secondary] = []
        self.takeover.take_over(secondary, server['id'])
        server, _ = self._wait_for_host(server, secondary)
        deadline = time.monotonic() + TIMEOUT
        while any(k.startswith(volumes.STANDBY_PREFIX)
                  for k in self._sysmeta(self.api.get_server(server['id']))):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        bdms = self._bdms(server)
        for volume_id in old:
            made = standby[volumes.standby_key(volume_id)]
            # one attachment left, the secondary's, the mapping on it
            self.assertEqual({made: secondary},
                             self._attachments(volume_id))
            self.assertEqual(made, bdms[volume_id].attachment_id)
            info = json.loads(bdms[volume_id].connection_info)
            self.assertEqual((volume_id, made),
                             (info['serial'], info['data']['attachment_id']))

    def test_deleting_the_server_deletes_the_standby_attachments(self) -> None:
        server = self._boot_bfv()
        primary, secondary, _ = self._roles(server)
        self._stand_by(server, secondary, primary)
        standby = self._wait_standby(server, 2)
        self.takeover.running[secondary] = []
        self._delete_server(server)
        for key, made in standby.items():
            volume_id = key[len(volumes.STANDBY_PREFIX):]
            self.assertNotIn(made, self._attachments(volume_id))

    def test_a_volume_on_another_backend_is_refused(self) -> None:
        self.useFixture(fixtures.MonkeyPatch(
            'nova.tests.fixtures.cinder.CinderFixture.'
            'VOLUME_CONNECTION_INFO',
            dict(CINDER.VOLUME_CONNECTION_INFO, fake=RBD_INFO,
                 **{DATA_VOLUME: {'driver_volume_type': 'iscsi',
                                  'data': {'target_lun': '1'}}})))
        server = self._post(self.ft_flavor, expected_state='ERROR',
                            **self._data_volume())
        self.assertIn(protectable.build_refused(
            'a volume on iscsi (not Ceph RBD)', rbd_volumes=True),
            server['fault']['message'])
        self.assertEqual([], self.agent.of('protect'))

    def test_attaching_a_volume_stays_refused(self) -> None:
        server = self._boot_ft()
        exc = self.assertRaises(
            api_client.OpenStackApiException,
            self.api.post_server_volume, server['id'],
            {'volumeAttachment': {'volumeId': DATA_VOLUME}})
        self.assertEqual(400, exc.response.status_code)
        self.assertIn(protectable.change_refused(
            protectable.ATTACH_VOLUME, driver.REMEDY_FLAVOR), str(exc))


class TestRbdVolumeDetach(RbdVolumeTestBase):

    # casts stay casts, as in a deployment: the detach's error is the
    # instance action's, not the harness' synchronous answer
    CAST_AS_CALL = False

    def test_detaching_a_volume_of_a_protected_server_is_refused(
            self) -> None:
        server = self._boot_bfv()
        self.assertIn(driver.SECONDARY_HOST, self._sysmeta(server))
        # Nova detaches in the driver only where CONF.host is the
        # server's host; the harness' computes share one CONF
        self.flags(host=server['OS-EXT-SRV-ATTR:host'])
        self.api.delete_server_volume(server['id'], DATA_VOLUME)
        event = self._wait_for_instance_action_event(
            server, 'detach_volume', 'compute_detach_volume', 'Error')
        self.assertIn(protectable.change_refused(
            protectable.DETACH_VOLUME, driver.REMEDY_FLAVOR),
            event['details'])
        self.assertEqual('ACTIVE',
                         self.api.get_server(server['id'])['status'])
        self.assertIn(DATA_VOLUME, self._bdms(server))
        self.assertIn(DATA_VOLUME, [
            a['volumeId'] for a in
            self.api.get_server_volumes(server['id'])])
