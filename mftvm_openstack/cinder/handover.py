"""A protected server's volume attachment, moved to the host that took over.

Cinder records which host a volume is attached to (an *attachment*,
created with that host's connector). After a failover the same volume,
same ID, must be attached to the same server on its new host, and the
dead host's attachment must go (doc/volumes.rst). This is the attachment
half of Nova's live migration, split in time: the new host's attachment
is made when protection starts (so a failover needs nothing from Cinder
to restore the guest), and completed, with the old one deleted, when
the host takes over::

    handover = AttachmentHandover(volume_api, context)
    # protect, on the secondary's host (its os-brick connector):
    standby = handover.prepare(volume_id, server_uuid, connector,
                               mountpoint='/dev/vdb')
    standby.volume.blockdev('vol0', 'sec0')   # what its storage opens
    # failover, on that host, once the guest runs there:
    handover.take_over(standby, old_attachment_id)
    # or protection ends without a failover:
    handover.abandon(standby)

``volume_api`` is Nova's ``nova.volume.cinder.API`` (or anything with its
four ``attachment_*`` methods); its answers are checked here, never
trusted. Each step may be repeated after a crash half way: an
attachment already gone counts as deleted (``gone``: the exception
types that mean "not found", Nova's ``VolumeAttachmentNotFound``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any, Optional, Protocol

from mftvm_openstack.cinder.connection import InvalidConnection, RbdVolume

LOG = logging.getLogger(__name__)

UUID_RE = re.compile(r'^[0-9a-fA-F-]{32,36}$')


class VolumeAPI(Protocol):
    """The part of Nova's ``nova.volume.cinder.API`` used here."""

    def attachment_create(self, context: Any, volume_id: str,
                          instance_id: str, connector: Any = None,
                          mountpoint: Any = None) -> Mapping[str, Any]: ...

    def attachment_complete(self, context: Any,
                            attachment_id: str) -> Any: ...

    def attachment_get(self, context: Any,
                       attachment_id: str) -> Mapping[str, Any]: ...

    def attachment_delete(self, context: Any, attachment_id: str) -> Any: ...


class HandoverError(Exception):
    """An attachment could not be made or moved; the message says why."""


@dataclasses.dataclass(frozen=True)
class StandbyAttachment:
    """A volume's attachment on the host that stands by (the secondary)."""

    volume_id: str
    instance_uuid: str
    attachment_id: str
    #: the host Cinder recorded (the connector's ``host``)
    host: str
    volume: RbdVolume
    #: Cinder's connection_info as Nova keeps it in the block device
    #: mapping (``data`` holds what ``volume`` was checked from)
    connection_info: Mapping[str, Any]


class AttachmentHandover:
    """Cinder attachments of one server's volumes across a failover."""

    def __init__(self, volume_api: VolumeAPI, context: Any,
                 gone: tuple[type[BaseException], ...] = ()) -> None:
        self.api = volume_api
        self.context = context
        self.gone = gone

    def prepare(self, volume_id: str, instance_uuid: str,
                connector: Mapping[str, Any],
                mountpoint: Optional[str] = None) -> StandbyAttachment:
        """A new attachment of ``volume_id`` to the same server, with
        this host's ``connector``; left *attaching* (not completed) so
        that Cinder still shows the volume on the primary's host. An
        answer that cannot be used (not RBD, or a name that is not this
        volume's) deletes the attachment again before raising."""
        _check_id('volume', volume_id)
        _check_id('server', instance_uuid)
        host = connector.get('host') if isinstance(connector, Mapping) \
            else None
        if not isinstance(host, str) or not host:
            raise HandoverError('the connector names no host')
        ref = self.api.attachment_create(
            self.context, volume_id, instance_uuid, connector=dict(connector),
            mountpoint=mountpoint)
        attachment_id = ref.get('id') if isinstance(ref, Mapping) else None
        if not isinstance(attachment_id, str) or not UUID_RE.match(
                attachment_id):
            raise HandoverError(f'Cinder answered no attachment id for '
                                f'volume {volume_id}')
        try:
            info = ref.get('connection_info')
            volume = RbdVolume.from_connection_info(info)
            if volume.volume_id != volume_id:
                raise InvalidConnection(
                    f'connection_info is for volume {volume.volume_id}')
        except InvalidConnection as exc:
            self.delete(attachment_id)
            raise HandoverError(f'volume {volume_id}: {exc}') from None
        assert isinstance(info, Mapping)
        LOG.info('volume %s: attachment %s made for host %s (standing by)',
                 volume_id, attachment_id, host)
        return StandbyAttachment(volume_id=volume_id,
                                 instance_uuid=instance_uuid,
                                 attachment_id=attachment_id, host=host,
                                 volume=volume, connection_info=info)

    def recall(self, volume_id: str, instance_uuid: str,
               attachment_id: str, host: str) -> StandbyAttachment:
        """The standby attachment ``attachment_id`` that :meth:`prepare`
        made earlier (its id is all a host keeps of it), read back from
        Cinder and checked as :meth:`prepare` checks it."""
        _check_id('volume', volume_id)
        _check_id('attachment', attachment_id)
        ref = self.api.attachment_get(self.context, attachment_id)
        if not isinstance(ref, Mapping):
            raise HandoverError(f'attachment {attachment_id}: no answer')
        info = ref.get('connection_info')
        try:
            volume = RbdVolume.from_connection_info(info)
        except InvalidConnection as exc:
            raise HandoverError(f'volume {volume_id}: {exc}') from None
        if volume.volume_id != volume_id:
            raise HandoverError(f'attachment {attachment_id} is not of '
                                f'volume {volume_id}')
        assert isinstance(info, Mapping)
        return StandbyAttachment(volume_id=volume_id,
                                 instance_uuid=instance_uuid,
                                 attachment_id=attachment_id, host=host,
                                 volume=volume, connection_info=info)

    def take_over(self, standby: StandbyAttachment,
                  old_attachment_id: Optional[str]) -> None:
        """The guest now runs on ``standby``'s host: complete its
        attachment, then delete the dead host's (``old_attachment_id``;
        already gone is fine). Safe to repeat."""
        self.api.attachment_complete(self.context, standby.attachment_id)
        if old_attachment_id and old_attachment_id != standby.attachment_id:
            _check_id('attachment', old_attachment_id)
            self.delete(old_attachment_id)
        LOG.info('volume %s: attached on %s (attachment %s), the old '
                 'attachment %s removed', standby.volume_id, standby.host,
                 standby.attachment_id, old_attachment_id)

    def abandon(self, standby: StandbyAttachment) -> None:
        """Protection ended without a failover: the standing-by host's
        attachment goes (already gone is fine)."""
        self.delete(standby.attachment_id)

    def delete(self, attachment_id: str) -> None:
        """Delete attachment ``attachment_id``; already gone is fine."""
        try:
            self.api.attachment_delete(self.context, attachment_id)
        except self.gone:
            LOG.debug('attachment %s was gone already', attachment_id)


def _check_id(what: str, value: Any) -> None:
    if not isinstance(value, str) or not UUID_RE.match(value):
        raise HandoverError(f'{what} id {value!r} refused')
