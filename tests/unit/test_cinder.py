"""mftvm_openstack.cinder: RBD connection_info checked, attachments moved.

The attachment tests run against :class:`FakeCinder`, which keeps
Cinder's rules for a non-multiattach volume that matter here: a second
attachment only for the same server (what live migration relies on), an
attachment with a connector gets the backend's connection_info for that
host, a completed one is what ``volume show`` lists, a deleted one is
gone (deleting it again raises Nova's "not found").
"""

from __future__ import annotations

import copy
import doctest
import unittest
import uuid

from mftvm_openstack.cinder import connection, handover
from mftvm_openstack.cinder.connection import InvalidConnection, RbdVolume
from mftvm_openstack.cinder.handover import (
    AttachmentHandover,
    HandoverError,
)

VOLUME = str(uuid.uuid4())
SERVER = str(uuid.uuid4())
SECRET = str(uuid.uuid4())


def rbd_info(volume_id: str = VOLUME, **data) -> dict:
    """Cinder RBD driver's connection_info, as Nova translates it."""
    info = {'driver_volume_type': 'rbd', 'data': {
        'name': f'volumes/volume-{volume_id}', 'hosts': ['10.78.1.1'],
        'ports': ['6789'], 'cluster_name': 'ceph', 'auth_enabled': True,
        'auth_username': 'cinder', 'secret_type': 'ceph',
        'secret_uuid': SECRET, 'volume_id': volume_id, 'discard': True}}
    info['data'].update(data)
    return info


class AttachmentNotFound(Exception):
    """Nova's VolumeAttachmentNotFound, for the fake."""


class FakeCinder:
    """Nova's volume API over an in-memory Cinder."""

    def __init__(self, info=rbd_info) -> None:
        self.info = info
        #: attachment id -> {volume, server, host, status}
        self.attachments: dict[str, dict] = {}
        self.calls: list[tuple[str, str]] = []

    def attachment_create(self, context, volume_id, instance_id,
                          connector=None, mountpoint=None):
        self.calls.append(('create', volume_id))
        others = {a['server'] for a in self.attachments.values()
                  if a['volume'] == volume_id}
        if others - {instance_id}:
            raise RuntimeError('volume is attached to another server')
        attachment_id = str(uuid.uuid4())
        self.attachments[attachment_id] = {
            'volume': volume_id, 'server': instance_id,
            'host': connector['host'], 'status': 'attaching',
            'mountpoint': mountpoint}
        return {'id': attachment_id,
                'connection_info': copy.deepcopy(self.info(volume_id))}

    def attachment_complete(self, context, attachment_id):
        self.calls.append(('complete', attachment_id))
        if attachment_id not in self.attachments:
            raise AttachmentNotFound(attachment_id)
        self.attachments[attachment_id]['status'] = 'attached'

    def attachment_get(self, context, attachment_id):
        if attachment_id not in self.attachments:
            raise AttachmentNotFound(attachment_id)
        return {'id': attachment_id, 'connection_info': copy.deepcopy(
            self.info(self.attachments[attachment_id]['volume']))}

    def attachment_delete(self, context, attachment_id):
        self.calls.append(('delete', attachment_id))
        if self.attachments.pop(attachment_id, None) is None:
            raise AttachmentNotFound(attachment_id)

    def attach(self, volume_id, server, host) -> str:
        """An attachment Nova made when it booted the server."""
        ref = self.attachment_create(None, volume_id, server,
                                     connector={'host': host})
        self.attachment_complete(None, ref['id'])
        self.calls.clear()
        return ref['id']

    def shown(self, volume_id) -> list[tuple[str, str]]:
        """(server, host) of each attachment ``volume show`` lists."""
        return sorted((a['server'], a['host'])
                      for a in self.attachments.values()
                      if a['volume'] == volume_id
                      and a['status'] == 'attached')


class RbdVolumeTest(unittest.TestCase):

    def test_doctests(self):
        self.assertEqual(0, doctest.testmod(connection).failed)

    def test_cinder_rbd_answer_typed(self):
        volume = RbdVolume.from_connection_info(rbd_info())
        self.assertEqual(
            RbdVolume(volume_id=VOLUME, pool='volumes',
                      image=f'volume-{VOLUME}',
                      monitors=(('10.78.1.1', 6789),), user='cinder',
                      secret_uuid=SECRET, cluster='ceph'), volume)
        self.assertEqual({
            'driver': 'rbd', 'node-name': 'vol0', 'pool': 'volumes',
            'image': f'volume-{VOLUME}',
            'server': [{'host': '10.78.1.1', 'port': '6789'}],
            'user': 'cinder', 'auth-client-required': ['cephx'],
            'key-secret': 'sec0'}, volume.blockdev('vol0', 'sec0'))

    def test_no_cephx_no_user(self):
        volume = RbdVolume.from_connection_info(rbd_info(
            auth_enabled=False, auth_username=None, secret_uuid=None))
        self.assertIsNone(volume.user)
        self.assertIsNone(volume.secret_uuid)
        self.assertNotIn('user', volume.blockdev('vol0', None))

    def test_several_monitors_and_ipv6(self):
        volume = RbdVolume.from_connection_info(rbd_info(
            hosts=['10.0.0.1', '[fd00::2]', 'mon3.example'],
            ports=['6789', 3300, '6789']))
        self.assertEqual((('10.0.0.1', 6789), ('[fd00::2]', 3300),
                          ('mon3.example', 6789)), volume.monitors)

    def test_hostile_answers_refused(self):
        for change, says in (
                ({'driver_volume_type': 'iscsi'}, "backend 'iscsi'"),
                ({'driver_volume_type': None}, 'backend None'),
                ({'data': None}, 'no data'),
                ({'data': {'name': 'volumes/v/x'}}, 'not pool/image'),
                ({'data': {'name': 'volumes'}}, 'not pool/image'),
                ({'data': {'name': 'vol,umes/v'}}, "pool 'vol,umes'"),
                ({'data': {'name': 'volumes/v:conf=x'}},
                 "image 'v:conf=x'"),
                ({'data': {'name': 'volumes/v@snap'}}, "image 'v@snap'"),
                ({'data': {'volume_id': 'a b'}}, "volume_id 'a b'"),
                ({'data': {'hosts': [], 'ports': []}}, 'monitors'),
                ({'data': {'hosts': ['10.0.0.1'], 'ports': []}},
                 'monitors'),
                ({'data': {'hosts': ['10.0.0.1;x'], 'ports': ['6789']}},
                 "host '10.0.0.1;x'"),
                ({'data': {'hosts': ['10.0.0.1'] * 17,
                           'ports': ['6789'] * 17}}, 'monitors'),
                ({'data': {'ports': ['0']}}, "port '0'"),
                ({'data': {'ports': ['65536']}}, "port '65536'"),
                ({'data': {'ports': [True]}}, 'port True'),
                ({'data': {'ports': ['x']}}, "port 'x'"),
                ({'data': {'auth_username': 'cinder,admin'}},
                 "user 'cinder,admin'"),
                ({'data': {'auth_username': None}}, 'user None'),
                ({'data': {'secret_uuid': 'not-a-uuid'}},
                 "secret_uuid 'not-a-uuid'"),
                ({'data': {'cluster_name': '../x'}}, "cluster name '../x'"),
        ):
            info = rbd_info()
            for key, value in change.items():
                if key == 'data' and isinstance(value, dict):
                    info['data'].update(value)
                else:
                    info[key] = value
            with self.assertRaises(InvalidConnection, msg=change) as ctx:
                RbdVolume.from_connection_info(info)
            self.assertIn(says, str(ctx.exception), change)
        with self.assertRaises(InvalidConnection):
            RbdVolume.from_connection_info(['rbd'])


class AttachmentHandoverTest(unittest.TestCase):

    def setUp(self) -> None:
        super().setUp()
        self.cinder = FakeCinder()
        self.old = self.cinder.attach(VOLUME, SERVER, 'h1')
        self.handover = AttachmentHandover(self.cinder, 'ctx',
                                           gone=(AttachmentNotFound,))

    def test_prepare_attaches_for_the_standby_host_only(self):
        standby = self.handover.prepare(VOLUME, SERVER, {'host': 'h2'},
                                        mountpoint='/dev/vdb')
        self.assertEqual(('h2', VOLUME, SERVER),
                         (standby.host, standby.volume_id,
                          standby.instance_uuid))
        self.assertEqual('volumes', standby.volume.pool)
        self.assertEqual('rbd',
                         standby.connection_info['driver_volume_type'])
        made = self.cinder.attachments[standby.attachment_id]
        self.assertEqual(('h2', 'attaching', '/dev/vdb'),
                         (made['host'], made['status'], made['mountpoint']))
        # Cinder still shows the volume on the primary's host alone.
        self.assertEqual([(SERVER, 'h1')], self.cinder.shown(VOLUME))

    def test_take_over_moves_the_attachment(self):
        standby = self.handover.prepare(VOLUME, SERVER, {'host': 'h2'})
        self.handover.take_over(standby, self.old)
        self.assertEqual([(SERVER, 'h2')], self.cinder.shown(VOLUME))
        self.assertEqual([standby.attachment_id],
                         list(self.cinder.attachments))
        # completed first: the volume is never shown attached nowhere
        self.assertEqual([('complete', standby.attachment_id),
                          ('delete', self.old)], self.cinder.calls[1:])

    def test_a_standby_recalled_by_its_id_is_taken_over(self):
        # the host keeps only the id (in Nova's system metadata)
        made = self.handover.prepare(VOLUME, SERVER, {'host': 'h2'})
        standby = self.handover.recall(VOLUME, SERVER, made.attachment_id,
                                       'h2')
        self.assertEqual(made, standby)
        self.handover.take_over(standby, self.old)
        self.assertEqual([(SERVER, 'h2')], self.cinder.shown(VOLUME))

    def test_a_recalled_attachment_of_another_volume_is_refused(self):
        other = str(uuid.uuid4())
        made = self.handover.prepare(VOLUME, SERVER, {'host': 'h2'})
        self.assertRaises(HandoverError, self.handover.recall, other,
                          SERVER, made.attachment_id, 'h2')
        self.assertRaises(HandoverError, self.handover.recall, VOLUME,
                          SERVER, 'x; rm', 'h2')
        self.cinder.info = lambda v: {'driver_volume_type': 'iscsi'}
        self.assertRaises(HandoverError, self.handover.recall, VOLUME,
                          SERVER, made.attachment_id, 'h2')

    def test_take_over_repeated_after_a_crash(self):
        standby = self.handover.prepare(VOLUME, SERVER, {'host': 'h2'})
        self.handover.take_over(standby, self.old)
        self.handover.take_over(standby, self.old)
        self.assertEqual([(SERVER, 'h2')], self.cinder.shown(VOLUME))

    def test_abandon_leaves_the_primary_attached(self):
        standby = self.handover.prepare(VOLUME, SERVER, {'host': 'h2'})
        self.handover.abandon(standby)
        self.handover.abandon(standby)      # again: gone is fine
        self.assertEqual([(SERVER, 'h1')], self.cinder.shown(VOLUME))
        self.assertEqual([self.old], list(self.cinder.attachments))

    def test_other_errors_are_not_swallowed(self):
        standby = self.handover.prepare(VOLUME, SERVER, {'host': 'h2'})
        strict = AttachmentHandover(self.cinder, 'ctx')
        strict.abandon(standby)
        with self.assertRaises(AttachmentNotFound):
            strict.abandon(standby)

    def test_unusable_answer_deletes_the_new_attachment(self):
        for info in (lambda v: {'driver_volume_type': 'iscsi', 'data': {}},
                     lambda v: rbd_info(str(uuid.uuid4()))):
            cinder = FakeCinder(info)
            old = cinder.attach(VOLUME, SERVER, 'h1')
            with self.assertRaises(HandoverError) as ctx:
                AttachmentHandover(cinder, 'ctx').prepare(
                    VOLUME, SERVER, {'host': 'h2'})
            self.assertIn(VOLUME, str(ctx.exception))
            self.assertEqual([old], list(cinder.attachments))

    def test_bad_requests_refused_before_cinder_is_asked(self):
        for args in ((VOLUME, SERVER, {}),
                     (VOLUME, SERVER, {'host': ''}),
                     (VOLUME, SERVER, None),
                     ('../x', SERVER, {'host': 'h2'}),
                     (VOLUME, 'x y', {'host': 'h2'})):
            with self.assertRaises(HandoverError, msg=args):
                self.handover.prepare(*args)
        standby = self.handover.prepare(VOLUME, SERVER, {'host': 'h2'})
        with self.assertRaises(HandoverError):
            self.handover.take_over(standby, 'not an id')
        self.assertEqual([('create', VOLUME),
                          ('complete', standby.attachment_id)],
                         self.cinder.calls)

    def test_module_docstring_names_the_api(self):
        self.assertIn('attachment_create', handover.VolumeAPI.__dict__)
