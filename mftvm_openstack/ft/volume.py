"""A guest disk on shared storage (an RBD image) in a protected pair.

Both hosts reach the image itself, so it is not copied: the secondary's
epoch store is built *on* it, and only committed epochs are merged into
it (doc/volumes.rst, design (a)). The primary must then never write the
image while protected, or a failover would resume on writes of an epoch
that never committed. So its guest's writes go into a local buffer
instead, a qcow2 overlay over the image, and that buffer is what the
disk sync mirrors to the secondary (``sync=top``: only what the buffer
holds travels; the secondary's base already *is* the image)::

    buffer = VolumeBuffer(monitor, 'libvirt-2-format', '/run/mftvm/vm/vb1',
                          size)
    top = await buffer.insulate()       # guest writes now land in it
    sync = load_disk_sync('async-replication', monitor, top)
    sync.initial_sync = 'top'
    await sync.start(target)            # the store: shared=SharedDisk(...)
    ...
    await sync.stop()                   # the secondary was lost
    # (its storage client fenced first: fencing.ceph)
    await buffer.release()              # the buffer merged into the image;
                                        # the guest writes it directly again

The secondary's side is :class:`~.disk.EpochOverlayStore` with
``shared=`` a :class:`~mftvm_openstack.contract.volume.SharedDisk`: its
base is the image (opened as :mod:`.shared_image` says), a first overlay
sits on it before anything arrives, and :meth:`~.disk.EpochOverlayStore.
failover_layers` returns the image as the chain's base
(:func:`.shared_image.chain_filename`).

Why this holds: a write of the guest's is in the buffer (primary) and
in the overlay of its epoch (secondary); the image receives it only by a
merge of a committed overlay, or, once the secondary is gone and fenced,
by :meth:`VolumeBuffer.release`. The buffer holds every write since
:meth:`~VolumeBuffer.insulate` (it is not trimmed yet), so releasing it
leaves the image newer than anything the secondary merged.
"""

from __future__ import annotations

import contextlib
import logging
import os

from mftvm_openstack.files import private_dir
from mftvm_openstack.ft import disk as ft_disk
from mftvm_openstack.ft.monitor import Monitor, MonitorError

LOG = logging.getLogger(__name__)


class VolumeBuffer:
    """The primary's local buffer over a shared image (see the module).

    ``node`` is the guest's disk node on the image (its format node);
    the buffer's qcow2 file lives in ``workdir`` (0600, removed by
    :meth:`release`).
    """

    JOB = 'vbuf-commit'

    def __init__(self, monitor: Monitor, node: str, workdir: str,
                 size: int, name: str = 'vbuf') -> None:
        self.monitor = monitor
        self.node = node
        self.workdir = workdir
        self.size = size
        #: the buffer's node, over ``node`` while insulated
        self.top = name
        self.path = os.path.join(workdir, f'{name}.qcow2')
        self.job = f'{name}-commit'
        self.insulated = False
        #: the longest :meth:`release` waits for its merge
        self.release_timeout = 600.0

    async def insulate(self) -> str:
        """Put the buffer over the image: from now on the guest's writes
        land in the buffer and never reach the image from here. Returns
        the buffer's node (what the disk sync mirrors, ``sync=top``).

        ``blockdev-snapshot`` drains the guest's requests around the
        switch, so no write is half in each; no pause is needed.
        """
        if self.insulated:
            return self.top
        private_dir(self.workdir)
        await ft_disk.create_qcow2(self.path, self.size)
        try:
            await self.monitor.execute('blockdev-add', **{
                'driver': 'qcow2', 'node-name': self.top, 'backing': None,
                'file': {'driver': 'file', 'filename': self.path,
                         'node-name': f'{self.top}-file'}})
            try:
                await self.monitor.execute('blockdev-snapshot',
                                           node=self.node,
                                           overlay=self.top)
            except BaseException:
                await ft_disk.quietly(self.monitor, 'blockdev-del',
                                      **{'node-name': self.top})
                raise
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            raise
        self.insulated = True
        LOG.info('guest disk %s: writes buffered in %s, not written to '
                 'the shared image while protected', self.node, self.path)
        return self.top

    async def release(self) -> None:
        """Merge the buffer into the image and drop it: the guest writes
        the image directly again (an unprotected guest's disk).

        Call once no secondary can write the image any more (stopped, or
        fenced at the storage): the buffer holds every write since
        :meth:`insulate`, so it overwrites whatever the secondary merged
        with the same or newer data. DiskError if the merge fails: the
        buffer is then kept, and the guest runs on it (nothing lost)."""
        if not self.insulated:
            return
        monitor = self.monitor
        await monitor.execute('block-commit', **{
            'job-id': self.job, 'device': self.top, 'top-node': self.top,
            'base-node': self.node, 'auto-dismiss': False})
        info = await ft_disk.wait_job(monitor, self.job,
                                      frozenset({'ready'}),
                                      self.release_timeout)
        if info is None or info['status'] != 'ready':
            await ft_disk.quietly(monitor, 'job-dismiss', id=self.job)
            raise ft_disk.DiskError(
                f'the buffer of {self.node} was not merged into the shared '
                f'image: {(info or {}).get("error", "job vanished")}')
        # The pivot: the guest's device now writes the image itself.
        await monitor.execute('block-job-complete', device=self.job)
        info = await ft_disk.wait_job(monitor, self.job, frozenset(),
                                      self.release_timeout)
        await ft_disk.quietly(monitor, 'job-dismiss', id=self.job)
        if info is not None and info.get('error'):
            raise ft_disk.DiskError(f'the buffer of {self.node} was not '
                                    f'merged: {info["error"]}')
        await ft_disk.quietly(monitor, 'blockdev-del',
                              **{'node-name': self.top})
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.insulated = False
        LOG.info('guest disk %s: buffer merged, the guest writes the '
                 'shared image again', self.node)

    async def discard(self) -> None:
        """The guest is gone (failed over, stopped): delete the buffer's
        file. Never touches the image."""
        with contextlib.suppress(MonitorError):
            if self.insulated:
                await ft_disk.quietly(self.monitor, 'blockdev-del',
                                      **{'node-name': self.top})
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self.insulated = False
