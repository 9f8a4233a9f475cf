"""A protected server's Cinder volumes, on Nova's side (doc/volumes.rst).

The same volume, same ID, must be attached to the server on whichever
host runs it, with Cinder's records saying so. The driver does it in
three steps, each through Cinder's attachment API
(:class:`~mftvm_openstack.cinder.handover.AttachmentHandover`) with the
host's own os-brick connector, as live migration does:

* **stand by**: the secondary's nova-compute, at its look at what its
  agent stands by for, makes its own attachment of each volume, left
  *attaching* (``volume show`` still names the primary's host alone),
  and records its id in the server's system metadata
  (``ft_standby_attachment_<volume id>``);
* **take over**: once its agent runs the guest and the server's record
  moved to it (``handoff``), it completes those attachments, deletes
  the dead host's, and points each block device mapping at its own;
* **abandon**: protection ends without a failover (the secondary
  released): the standby attachments are deleted.

::

    volumes = ServerVolumes(context, instance)
    volumes.stand_by(host, connector)    # the secondary's host
    volumes.take_over(host)              # that host, after the hand-off
    volumes.abandon()                    # or: the secondary released

Each step may be repeated after a crash half way (an attachment already
made is kept, one already gone counts as deleted).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import nova.exception as nova_exception
import nova.objects.block_device as bdm_obj
from nova.volume import cinder as nova_cinder
from oslo_log import log as logging

from mftvm_openstack.cinder.handover import AttachmentHandover

LOG = logging.getLogger(__name__)

#: system metadata: ``<prefix><volume id>`` → the id of the attachment
#: the secondary's host made of that volume
STANDBY_PREFIX = 'ft_standby_attachment_'


def standby_key(volume_id: str) -> str:
    """The system-metadata key of ``volume_id``'s standby attachment."""
    return f'{STANDBY_PREFIX}{volume_id}'


class ServerVolumes:
    """The Cinder volumes of one FT server (see the module)."""

    def __init__(self, context: Any, instance: Any,
                 volume_api: Optional[Any] = None) -> None:
        self.context = context
        self.instance = instance
        self.handover = AttachmentHandover(
            volume_api if volume_api is not None else nova_cinder.API(),
            context, gone=(nova_exception.VolumeAttachmentNotFound,))

    def mappings(self) -> Iterator[Any]:
        """The server's volume block device mappings."""
        for bdm in bdm_obj.BlockDeviceMappingList.get_by_instance_uuid(
                self.context, self.instance.uuid):
            if bdm.is_volume and bdm.volume_id:
                yield bdm

    def stand_by(self, host: str, connector: Mapping[str, Any]) -> int:
        """An attachment of each volume for ``host`` (the secondary's),
        with its ``connector``; how many were made now. The caller saves
        the instance. HandoverError if Cinder's answer cannot be used
        (not RBD): that attachment is deleted again."""
        sysmeta = self.instance.system_metadata
        made = 0
        for bdm in self.mappings():
            if sysmeta.get(standby_key(bdm.volume_id)):
                continue
            standby = self.handover.prepare(
                bdm.volume_id, self.instance.uuid,
                dict(connector, host=host), mountpoint=bdm.device_name)
            sysmeta[standby_key(bdm.volume_id)] = standby.attachment_id
            made += 1
        return made

    def take_over(self, host: str) -> list[str]:
        """The guest runs on ``host`` now: each volume's standby
        attachment completed, the old one deleted, the mapping pointed at
        the new one (saved). Returns the volumes moved; a volume with no
        standby attachment is logged and left (nothing to move it to)."""
        sysmeta = self.instance.system_metadata
        moved = []
        for bdm in self.mappings():
            attachment_id = sysmeta.get(standby_key(bdm.volume_id))
            if not attachment_id:
                LOG.error('Volume %s has no attachment for %s: its '
                          'Cinder records stay on the old host',
                          bdm.volume_id, host, instance=self.instance)
                continue
            standby = self.handover.recall(bdm.volume_id,
                                           self.instance.uuid,
                                           attachment_id, host)
            self.handover.take_over(standby, bdm.attachment_id)
            info = dict(standby.connection_info, serial=bdm.volume_id)
            bdm.attachment_id = standby.attachment_id
            bdm.connection_info = json.dumps(info)
            bdm.save()
            sysmeta.pop(standby_key(bdm.volume_id), None)
            moved.append(bdm.volume_id)
        self.instance.save()
        return moved

    def abandon(self) -> None:
        """Delete every standby attachment recorded (the caller saves the
        instance)."""
        sysmeta = self.instance.system_metadata
        for key in [k for k in sysmeta if k.startswith(STANDBY_PREFIX)]:
            attachment_id = sysmeta[key]
            try:
                self.handover.delete(attachment_id)
            except Exception as exc:
                LOG.warning('Standby attachment %s not deleted: %s',
                            attachment_id, exc, instance=self.instance)
                continue
            del sysmeta[key]
