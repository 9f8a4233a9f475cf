"""Disk replication: the primary's disk-sync plugins and the secondary's store.

The guest disk of a protected instance exists twice. The primary's copy is
the guest's own disk node (``disk0``); the secondary's copy is an
:class:`EpochOverlayStore`: a ``qemu-storage-daemon`` (qsd) that serves the
replica over NBD and keeps what arrives **epoch-buffered**, so a failover
can hand the restored guest a disk that matches the committed epoch's RAM
and device state exactly.

Secondary side::

    store = EpochOverlayStore('/var/lib/mftvm/vm0/disk', size=disk_size)
    target = await store.start()     # NbdTarget(socket=..., export='disk0')
    ...
    await store.mark(7)              # in epoch 7's checkpoint pause
    await store.commit(7)            # epoch 7 applied: may merge down
    ...
    layers = await store.failover_layers(committed_epoch=7)
    argv = vm.qemu_argv(spec, paths, ram, disk_layers=layers, incoming=True)

The qsd graph is ``export → top (throttle filter, no limits) → overlay →
… → base (raw)``. ``mark(N)`` puts a fresh qcow2 overlay, the file
``ov-{N+1}.qcow2``, under the filter (``blockdev-snapshot``), so the
writes of epoch N+1 land in it and each layer holds exactly one range of
epochs. Committed layers are merged
into ``base`` by ``block-commit`` in the background; uncommitted layers
are dropped on failover.

Why the filter: ``block-commit`` must be rooted at a root node and blocks
every operation, ``blockdev-snapshot`` included, on that root while it
runs. With the filter as the root, marks (which snapshot the overlay under
it) never wait for a merge.

Primary side: plugins of the stevedore namespace ``mftvm.ft.disk_sync``
(any installed package may add one; see
:mod:`mftvm_openstack.contract.plugins`). This package registers three:

``async-replication`` (:class:`AsyncReplication`, the default)
    A ``blockdev-mirror`` in the background to the store's NBD export:
    guest writes travel to the replica as they happen, without waiting
    for it, and each checkpoint waits for the few still on their way.
    Only a committed epoch's writes count on the secondary, so nothing
    is lost by not waiting per write.
``write-replication`` (:class:`WriteReplication`)
    The same mirror with ``copy-mode=write-blocking``: each guest write
    completes only once it is on both disks, and the checkpoint waits for
    nothing; every sync write pays a round trip to the replica. Both
    mirrors also perform the initial sync of the running guest.
``block-copy`` (:class:`BlockCopy`)
    The MFTVM 3 baseline kept for benchmarks: a dirty bitmap, and an
    incremental ``blockdev-backup`` of the epoch's dirty blocks inside
    every pause.

Example::

    sync = load_disk_sync('async-replication', monitor)
    await sync.start(target)         # returns once the replica is in sync
    await sync.checkpoint(epoch)     # in each pause, before device state
    sync.failed                      # asyncio.Event: the replica is lost
    await sync.stop()                # secondary lost, or unprotect

Block jobs are waited for by their ``JOB_STATUS_CHANGE`` events (each
wait has its own event stream, so the engine's waits on the same monitor
take none away), with a look at ``query-jobs`` every few seconds in case
QEMU went away. The one wait with no event is the checkpoint's drain of
an asynchronous mirror, which polls ``query-block-jobs``.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import contextlib
import dataclasses
import glob
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Optional

from mftvm_openstack.contract import plugins
from mftvm_openstack.contract.volume import SharedDisk
from mftvm_openstack.files import create_private, private_dir
from mftvm_openstack.ft import shared_image, vm
from mftvm_openstack.ft.monitor import Event, Monitor, MonitorError, QMPMonitor
from mftvm_openstack.ft.plugin_loader import load_plugin_class

LOG = logging.getLogger(__name__)

EXPORT_NAME = 'disk0'
#: Job states after which a job does no more I/O.
_DONE = frozenset({'concluded', 'null'})


class DiskError(Exception):
    """Replication or the replica store cannot do what was asked."""


#: The replica's files skip fsync. A flush from the primary still gets
#: every write (and qcow2's metadata) to this host's page cache, which is
#: all a failover here reads; and if this host itself crashes, its
#: replica is given up anyway (the primary re-protects elsewhere).
#: Durability is the primary disk's job. (It spares one fsync per guest
#: flush; on this noisy machine the IOPS gain was not measurable.)
REPLICA_CACHE = {'no-flush': True}


@dataclasses.dataclass(frozen=True)
class NbdServerTls:
    """TLS for the store's NBD server: QEMU reads the x509 credentials in
    ``creds_dir`` (``ca-cert.pem``, ``server-cert.pem``,
    ``server-key.pem``), requires a client certificate of that CA, and
    lets only the client whose distinguished name is ``client_dn``
    (e.g. ``CN=mftvm-primary-...``) use the export."""

    creds_dir: str
    client_dn: str


@dataclasses.dataclass(frozen=True)
class NbdTarget:
    """Where the secondary serves the replica: a unix socket or host:port."""

    socket: Optional[str] = None
    host: Optional[str] = None
    port: Optional[int] = None
    export: str = EXPORT_NAME
    #: a client reaches it over TLS: the id of the ``tls-creds-x509``
    #: object (endpoint=client) in the client's QEMU, and the name the
    #: server's certificate must carry
    tls_creds: Optional[str] = None
    tls_hostname: Optional[str] = None

    def __post_init__(self) -> None:
        if (self.socket is None) == (self.host is None or self.port is None):
            raise ValueError('NbdTarget needs either socket, or host and port')

    def qmp_server(self) -> dict[str, Any]:
        """The ``server`` argument (SocketAddress) of an nbd blockdev-add."""
        if self.socket is not None:
            return {'type': 'unix', 'path': self.socket}
        return {'type': 'inet', 'host': self.host, 'port': str(self.port)}

    def qmp_tls(self) -> dict[str, Any]:
        """The TLS arguments of an nbd blockdev-add (none without TLS)."""
        if self.tls_creds is None:
            return {}
        args = {'tls-creds': self.tls_creds}
        if self.tls_hostname is not None:
            args['tls-hostname'] = self.tls_hostname
        return args

    def uri(self) -> str:
        """The export as an NBD URI (for qemu-img / qemu-io)."""
        if self.socket is not None:
            return f'nbd+unix:///{self.export}?socket={self.socket}'
        return f'nbd://{self.host}:{self.port}/{self.export}'


# -- block jobs ---------------------------------------------------------------

async def job_info(monitor: Monitor, job_id: str) -> Optional[dict[str, Any]]:
    """``query-jobs``' entry for ``job_id``, or None if there is none."""
    for job in await monitor.execute('query-jobs'):
        if job['id'] == job_id:
            return dict(job)
    return None


async def wait_job(monitor: Monitor, job_id: str, states: frozenset[str],
                   timeout: Optional[float],
                   recheck: float = 2.0) -> Optional[dict[str, Any]]:
    """Wait until ``job_id`` is in one of ``states`` or gone; return it.

    A job in a final state (concluded) is returned whatever ``states`` is,
    so callers see failures instead of timing out on them. The wait is
    for the job's ``JOB_STATUS_CHANGE`` events; every ``recheck`` s the
    job is looked at anyway, which raises MonitorError once QEMU is gone
    (a dead QEMU sends no event). ``timeout`` None: the caller bounds the
    wait (an initial sync takes as long as the disk is large).
    """
    wanted = states | _DONE
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout

    def is_it(event: Event) -> bool:
        data = event.get('data') or {}
        return data.get('id') == job_id and data.get('status') in (
            wanted | {'null'})
    # Subscribed before the first look: a change in between is queued.
    with monitor.events('JOB_STATUS_CHANGE') as events:
        while True:
            info = await job_info(monitor, job_id)
            if info is None or info['status'] in wanted:
                return info
            left = recheck if deadline is None else min(
                recheck, deadline - loop.time())
            if left <= 0:
                raise DiskError(f'job {job_id} still {info["status"]} after '
                                f'{timeout}s')
            with contextlib.suppress(MonitorError):     # no event: look
                await events.wait(is_it, left)


async def quietly(monitor: Monitor, command: str, **args: Any) -> bool:
    """Run a clean-up command; False (and a debug log) if it failed."""
    try:
        await monitor.execute(command, **args)
        return True
    except MonitorError as exc:
        LOG.debug('ignored: %s', exc)
        return False


async def create_qcow2(path: str, size: int) -> None:
    proc = await asyncio.create_subprocess_exec(
        'qemu-img', 'create', '-q', '-f', 'qcow2',
        # Subclusters: a 4 KiB write into a fresh overlay allocates 4 KiB,
        # not a 64 KiB cluster copied up from below.
        '-o', 'cluster_size=65536,extended_l2=on', path, str(size),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        umask=0o077)      # an overlay holds the tenant's writes: 0600
    try:
        out, _ = await proc.communicate()
    except asyncio.CancelledError:
        # Leave no qemu-img behind to create the file after a clean-up.
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    if proc.returncode != 0:
        raise DiskError(f'qemu-img create {path} failed: '
                        f'{out.decode(errors="replace").strip()}')


# -- secondary: the epoch-buffered replica ---------------------------------

@dataclasses.dataclass(frozen=True)
class Layer:
    """One image of the replica chain.

    It holds the writes of epochs ``first_epoch`` up to the epoch before
    the next layer's ``first_epoch`` (the top layer: up to now). The base
    has ``first_epoch`` 0: it holds everything from before the first mark
    and whatever has been merged into it.
    """

    node: str
    path: str
    fmt: str
    first_epoch: int


class LayerChain:
    """The bookkeeping of the replica chain, base first (no QEMU here).

    Rules that keep failover exact:

    * only committed layers are merged, and never the top (active) one;
    * failover to epoch C keeps the layers whose ``first_epoch`` ≤ C and
      needs a layer boundary at C+1 (C was marked and not merged past).
    """

    def __init__(self, base: Layer) -> None:
        self.layers: list[Layer] = [base]
        self.committed = -1
        self.last_mark: Optional[int] = None

    @property
    def top(self) -> Layer:
        return self.layers[-1]

    def buffer_base(self, layer: Layer) -> None:
        """Record ``layer``, over the base before any mark, as the
        layer of the epochs until the first mark: a base that is shared
        storage takes no write before its epoch commits."""
        if len(self.layers) != 1 or self.last_mark is not None:
            raise DiskError('the base is buffered before anything else')
        self.layers.append(dataclasses.replace(layer, first_epoch=0))

    def push(self, epoch: int, layer: Layer) -> None:
        """Record ``layer`` (holding epoch+1 on) as the new top."""
        if self.last_mark is not None and epoch <= self.last_mark:
            raise DiskError(f'mark({epoch}) after mark({self.last_mark}): '
                            f'epochs must increase')
        if layer.first_epoch != epoch + 1:
            raise DiskError(f'layer {layer.node} does not start at epoch '
                            f'{epoch + 1}')
        self.layers.append(layer)
        self.last_mark = epoch

    def commit(self, epoch: int) -> None:
        self.committed = max(self.committed, epoch)

    def mergeable(self) -> list[Layer]:
        """Overlays that may be merged into base now, bottom first.

        A layer qualifies when all its epochs are committed and it is not
        the top: the next layer starts at or before ``committed + 1``.
        """
        out = []
        for below, above in zip(self.layers[1:], self.layers[2:]):
            if above.first_epoch > self.committed + 1:
                break
            out.append(below)
        return out

    def merged(self, top: Layer) -> list[Layer]:
        """Forget the overlays base..``top`` merged into base; return them."""
        i = self.layers.index(top)
        if i == 0 or i == len(self.layers) - 1:
            raise DiskError(f'{top.node} is the base or the top: not merged')
        gone = self.layers[1:i + 1]
        del self.layers[1:i + 1]
        return gone

    def failover(self, committed: int) -> tuple[list[Layer], list[Layer]]:
        """(layers to keep, layers to drop) for a failover to ``committed``."""
        if self.last_mark is None or committed > self.last_mark:
            raise DiskError(f'epoch {committed} was never marked (last mark '
                            f'{self.last_mark}): its writes cannot be told '
                            f'apart from later ones')
        if not any(la.first_epoch == committed + 1 for la in self.layers):
            raise DiskError(f'no layer boundary after epoch {committed}: it '
                            f'was merged past, or not marked')
        keep = [la for la in self.layers if la.first_epoch <= committed]
        drop = [la for la in self.layers if la.first_epoch > committed]
        return keep, drop


class EpochOverlayStore:
    """The secondary's replica disk, served over NBD, epoch-buffered.

    ``mark`` runs inside the primary's checkpoint pause, so it is one QMP
    command (``blockdev-snapshot``, 2–5 ms here): the overlays come from a
    pool of qcow2 images created and opened ahead (nodes ``ov-poolN``)
    that a background task keeps filled.
    ``listen=(host, port)`` serves NBD over TCP instead of a unix socket;
    ``tls`` (:class:`NbdServerTls`) admits only the pair's primary.
    """

    TOP = 'top'        # the pass-through filter the export sits on
    BASE = 'base'
    EXPORT_ID = 'exp0'

    def __init__(self, workdir: str, size: int, *,
                 listen: Optional[tuple[str, int]] = None,
                 tls: Optional[NbdServerTls] = None,
                 pool_size: int = 4, merge_at: int = 2,
                 reuse: bool = False, name: str = EXPORT_NAME,
                 server: Optional[EpochOverlayStore] = None,
                 shared: Optional[SharedDisk] = None) -> None:
        #: the disk's name: its export, and its nodes' prefix (the first
        #: disk's nodes keep their plain names)
        self.name = name
        #: the store whose qsd and NBD server this one shares (None: it
        #: runs its own); :class:`ReplicaDisks` makes such sets
        self.server = server
        if name != EXPORT_NAME:
            self.TOP, self.BASE = f'{name}-top', f'{name}-base'
            self.EXPORT_ID = f'{name}-exp'
        self.target: Optional[NbdTarget] = None
        self.workdir = workdir
        self.size = size
        self.listen = listen
        self.tls = tls
        self.pool_size = pool_size
        self.merge_at = max(1, merge_at)
        self.reuse = reuse
        self.qmp_path = os.path.join(workdir, 'qsd.sock')
        self.nbd_path = os.path.join(workdir, 'nbd.sock')
        self.log_path = os.path.join(workdir, 'qsd.log')
        #: the image both hosts reach, as the base (None: a local replica)
        self.shared = shared
        self.base_path = os.path.join(workdir, 'base.raw') \
            if shared is None else shared_image.chain_filename(shared)
        self.chain = LayerChain(Layer(self.BASE, self.base_path, 'raw', 0))
        self.monitor: Optional[Monitor] = None
        self.process: Optional[vm.ChildProcess] = None
        # (node, file) of overlays already created *and opened* in qsd.
        self._pool: collections.deque[tuple[str, str]] = collections.deque()
        self._pool_seq = 0
        self._pool_wakeup = asyncio.Event()
        self._pool_task: Optional[asyncio.Task[None]] = None
        self._merge_task: Optional[asyncio.Task[None]] = None
        self._merge_seq = 0
        self._merge_job = ''
        #: the longest one merge into base may run before it is cancelled
        self.merge_timeout = 600.0
        self._closing = False     # no new work (merges, pool files)
        self._down = False        # qsd has quit
        self._failed_over = False
        self._stats: dict[str, Any] = {
            'marks': 0, 'merges': 0, 'merge_errors': 0, 'pool_misses': 0,
            'last_mark_ms': None, 'max_mark_ms': None}

    # -- lifecycle --

    async def start(self) -> NbdTarget:
        """Create the base, start qsd and export the replica; return where."""
        private_dir(self.workdir)
        for stale in (self._files('ov-*.qcow2') + self._files('pool-*.qcow2')
                      + [self.qmp_path, self.nbd_path]):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(stale)
        if self.shared is None and not (self.reuse and
                                        os.path.exists(self.base_path)):
            # sparse: costs no disk space
            os.close(create_private(self.base_path, self.size))
        if self.server is not None:
            assert self.server.monitor is not None, 'start the server first'
            return await self.attach(self.server.monitor)
        self.process = await vm.ChildProcess.start(
            vm.qsd_argv(self.qmp_path), self.log_path)
        try:
            monitor = await QMPMonitor.connect(self.qmp_path, name='qsd')
            return await self.attach(monitor)
        except BaseException:
            await self._quit()
            raise

    async def attach(self, monitor: Monitor) -> NbdTarget:
        """Build the graph and the export on the qsd behind ``monitor``.

        :meth:`start` is "spawn qsd, then attach"; tests attach fakes.
        """
        self.monitor = monitor
        if self.shared is not None:
            await self._add_shared_base(monitor, self.shared)
        else:
            await monitor.execute('blockdev-add', **{
                'driver': 'raw', 'node-name': self.BASE, 'discard': 'unmap',
                'cache': REPLICA_CACHE,
                'file': {'driver': 'file', 'filename': self.base_path,
                         'node-name': f'{self.BASE}-file',
                         'cache': REPLICA_CACHE}})
        # A throttle group without limits: a pass-through root node.
        group = 'tg0' if self.name == EXPORT_NAME else f'{self.name}-tg'
        await monitor.execute('object-add', **{
            'qom-type': 'throttle-group', 'id': group})
        await monitor.execute('blockdev-add', **{
            'driver': 'throttle', 'node-name': self.TOP,
            'throttle-group': group, 'file': self.BASE})
        if self.shared is not None:
            await self._buffer_shared_base(monitor)
        if self.server is not None:
            # The server's NBD server serves this disk too.
            assert self.server.target is not None
            target = dataclasses.replace(self.server.target,
                                         export=self.name)
            await self._export(monitor, target)
            return target
        if self.listen is None:
            addr: dict[str, Any] = {'type': 'unix',
                                    'data': {'path': self.nbd_path}}
            target = NbdTarget(socket=self.nbd_path)
        else:
            host, port = self.listen
            addr = {'type': 'inet', 'data': {'host': host, 'port': str(port)}}
            target = NbdTarget(host=host, port=port)
        secure: dict[str, Any] = {}
        if self.tls is not None:
            await monitor.execute('object-add', **{
                'qom-type': 'tls-creds-x509', 'id': 'tls0',
                'dir': self.tls.creds_dir, 'endpoint': 'server',
                'verify-peer': True})
            # Any certificate of the pair's CA passes the handshake;
            # only the primary's may open the export.
            await monitor.execute('object-add', **{
                'qom-type': 'authz-simple', 'id': 'authz0',
                'identity': self.tls.client_dn})
            secure = {'tls-creds': 'tls0', 'tls-authz': 'authz0'}
        await monitor.execute('nbd-server-start', addr=addr, **secure)
        await self._export(monitor, target)
        return target

    async def _add_shared_base(self, monitor: Monitor,
                               shared: SharedDisk) -> None:
        # The image itself, opened with this host's own credentials.
        secret = f'{self.BASE}-key'
        key = shared_image.secret_object(shared, secret)
        if key is not None:
            await monitor.execute('object-add', **key)
        await monitor.execute('blockdev-add', **shared_image.base_blockdev(
            shared, self.BASE, secret if key is not None else None))

    async def _buffer_shared_base(self, monitor: Monitor) -> None:
        # A shared image is the volume a failover resumes from: before
        # the export takes any write, an overlay goes over it, so that
        # even the writes before the first mark are merged into the
        # image only once committed.
        await self._add_to_pool()
        node, pooled = self._pool.popleft()
        path = os.path.join(self.workdir, 'ov-0.qcow2')
        os.replace(pooled, path)
        await monitor.execute('blockdev-snapshot', node=self.BASE,
                              overlay=node)
        self.chain.buffer_base(Layer(node, path, 'qcow2', 0))

    async def _export(self, monitor: Monitor, target: NbdTarget) -> None:
        await monitor.execute('block-export-add', type='nbd',
                              id=self.EXPORT_ID, writable=True,
                              name=target.export,
                              **{'node-name': self.TOP})
        self.target = target
        # The first marks may come at once: have the pool ready.
        await asyncio.gather(*(self._add_to_pool()
                               for _ in range(self.pool_size)))
        self._pool_task = asyncio.create_task(self._fill_pool())

    async def stop(self) -> None:
        """Quit qsd and remove the replica: overlays and base (a full copy
        of a tenant's disk must not outlive its protection). Idempotent.

        After :meth:`failover_layers` the kept layers belong to the
        restored guest and are left alone; with ``reuse`` the base is
        kept for the next :meth:`start`.
        """
        self._closing = True
        if not self._down:
            await self._cancel_tasks()
            await self._quit()
            self._down = True
        self._pool.clear()
        # Every overlay file goes but the restored guest's layers: the
        # chain's, and any a mark or merge cut short left outside it.
        keep = {la.path for la in self.chain.layers} \
            if self._failed_over else {self.base_path}
        for path in self._files('pool-*.qcow2') + self._files('ov-*.qcow2'):
            if path not in keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        if not self._failed_over:
            for layer in self.chain.layers[1:]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(layer.path)
            if not self.reuse and self.shared is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.base_path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.nbd_path)

    # -- epochs --

    @property
    def layers(self) -> list[tuple[str, str]]:
        """The current chain as (filename, format), base first."""
        return [(la.path, la.fmt) for la in self.chain.layers]

    async def mark(self, epoch: int) -> None:
        """Start buffering epoch+1: put a fresh overlay on top.

        Call inside the primary's pause for ``epoch``, once the guest is
        stopped and its writes are done, so no write straddles the mark.
        """
        monitor = self._live()
        t0 = time.perf_counter()
        if self.chain.last_mark is not None and epoch <= self.chain.last_mark:
            raise DiskError(f'mark({epoch}) after mark({self.chain.last_mark})'
                            f': epochs must increase')
        if not self._pool:
            # The pool could not keep up: slow, but still correct.
            self._stats['pool_misses'] += 1
            LOG.warning('overlay pool empty: creating one inside the pause')
            await self._add_to_pool()
        LOG.debug('mark %d: pool %d, merge %s', epoch, len(self._pool),
                  self._merge_job if self._merge_task else None)
        node, pooled = self._pool.popleft()
        self._pool_wakeup.set()
        # Name the file by the epochs it will hold (qsd keeps its fd).
        path = os.path.join(self.workdir, f'ov-{epoch + 1}.qcow2')
        os.replace(pooled, path)
        try:
            await monitor.execute('blockdev-snapshot',
                                  node=self.chain.top.node, overlay=node)
        except BaseException:
            # (refused, or the store stopping meanwhile) not in the chain
            with contextlib.suppress(Exception):
                await quietly(monitor, 'blockdev-del',
                               **{'node-name': node})
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            raise
        self.chain.push(epoch, Layer(node, path, 'qcow2', epoch + 1))
        ms = (time.perf_counter() - t0) * 1000
        LOG.debug('mark %d done in %.1f ms', epoch, ms)
        self._stats['marks'] += 1
        self._stats['last_mark_ms'] = ms
        self._stats['max_mark_ms'] = max(self._stats['max_mark_ms'] or 0, ms)

    async def commit(self, epoch: int) -> None:
        """Epoch ``epoch`` is committed: merge committed layers if due."""
        self.chain.commit(epoch)
        self._maybe_merge()

    def _maybe_merge(self) -> None:
        if self._closing or self.monitor is None or self._merge_task:
            return
        layers = self.chain.mergeable()
        if len(layers) < self.merge_at:
            return
        self._merge_seq += 1
        # (job ids are the qsd's: each disk of a shared one its own)
        self._merge_job = f'merge{self._merge_seq}' \
            if self.name == EXPORT_NAME \
            else f'{self.name}-merge{self._merge_seq}'
        self._merge_task = asyncio.create_task(
            self._merge(self.monitor, self._merge_job, layers[-1]))

    async def _merge(self, monitor: Monitor, job: str, top: Layer) -> None:
        try:
            if self._closing:
                return
            LOG.debug('merge %s: %s into base', job, top.node)
            await monitor.execute('block-commit', **{
                'job-id': job, 'device': self.TOP, 'top-node': top.node,
                'base-node': self.BASE, 'auto-dismiss': False})
            try:
                info = await wait_job(monitor, job, _DONE, self.merge_timeout)
            except DiskError:
                # A merge this slow holds up nothing but the next merge:
                # cancelled, the overlays keep their data above base.
                await quietly(monitor, 'block-job-cancel', device=job)
                info = await wait_job(monitor, job, _DONE, 10)
            await quietly(monitor, 'job-dismiss', id=job)
            if info is not None and info.get('error'):
                # Cancelled (failover) or failed: the overlays still hold
                # their data above base, so the chain is as before.
                if not self._closing:
                    self._stats['merge_errors'] += 1
                    LOG.warning('merge into base failed: %s', info['error'])
                return
            gone = self.chain.merged(top)
            self._stats['merges'] += 1
            # blockdev-add'ed nodes outlive the commit: delete them, top
            # down (each still holds the one below as its backing).
            for layer in reversed(gone):
                await quietly(monitor, 'blockdev-del',
                               **{'node-name': layer.node})
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(layer.path)
        except (MonitorError, DiskError) as exc:
            if not self._closing:
                self._stats['merge_errors'] += 1
                LOG.warning('merge into base failed: %s', exc)
        finally:
            self._merge_task = None
        self._maybe_merge()

    async def failover_layers(self,
                              committed_epoch: int) -> list[tuple[str, str]]:
        """Fence, settle and stop; return the chain of ``committed_epoch``.

        The returned (filename, format) layers, base first, hold exactly
        the writes of epochs ≤ ``committed_epoch``; the newer overlays are
        deleted. qsd has quit, so the files are free for the new QEMU.
        """
        monitor = self._live()
        self.chain.failover(committed_epoch)      # fail early if impossible
        self._closing = True
        # Fence first: a primary we believe dead must not write any more.
        await quietly(monitor, 'block-export-del', id=self.EXPORT_ID,
                       mode='hard')
        if self.server is None:
            await quietly(monitor, 'nbd-server-stop')
        merge = self._merge_task
        if merge is not None:
            # A half-done commit is harmless: the overlays keep their data
            # until the job completes, and a completed one is accounted.
            await quietly(monitor, 'block-job-cancel', device=self._merge_job)
            await merge
        await self._cancel_tasks()
        await self._quit()
        self._down = True
        keep, drop = self.chain.failover(committed_epoch)
        for layer in drop:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(layer.path)
        self.chain.layers = keep
        self._failed_over = True
        await self.stop()       # pool files and sockets
        return [(la.path, la.fmt) for la in keep]

    def stats(self) -> dict[str, Any]:
        return dict(self._stats, chain_length=len(self.chain.layers),
                    committed=self.chain.committed,
                    merging=self._merge_task is not None,
                    pool_ready=len(self._pool))

    # -- helpers --

    def _live(self) -> Monitor:
        if self.monitor is None or self._closing:
            raise DiskError('the replica store is not running')
        return self.monitor

    def _files(self, pattern: str) -> list[str]:
        return glob.glob(os.path.join(self.workdir, pattern))

    async def create_overlay_file(self, path: str) -> None:
        """Create one empty overlay image (tests replace this)."""
        await create_qcow2(path, self.size)

    async def _fill_pool(self) -> None:
        failing = False
        while not self._closing:
            if len(self._pool) >= self.pool_size:
                self._pool_wakeup.clear()
                await self._pool_wakeup.wait()
                continue
            try:
                await self._add_to_pool()
            except (DiskError, MonitorError) as exc:
                # (Its filesystem full, most likely.) Marks make their
                # overlay inside the pause meanwhile; try again once the
                # next mark (or a merge) may have freed some room, not
                # never again.
                if not failing:
                    LOG.error('cannot pre-create overlays: %s', exc)
                failing = True
                self._pool_wakeup.clear()
                await self._pool_wakeup.wait()
                continue
            if failing:
                LOG.info('pre-creating overlays again')
            failing = False

    async def _add_to_pool(self) -> None:
        # Opening the image costs more than the snapshot itself (~5 ms
        # vs ~2 ms here), so it is done ahead, outside any pause.
        monitor = self._live()
        self._pool_seq += 1
        node = f'ov-pool{self._pool_seq}'
        if self.name != EXPORT_NAME:
            node = f'{self.name}-{node}'
        path = os.path.join(self.workdir, f'pool-{self._pool_seq}.qcow2')
        await self.create_overlay_file(path)
        await monitor.execute('blockdev-add', **{
            'driver': 'qcow2', 'node-name': node, 'backing': None,
            'discard': 'unmap', 'cache': REPLICA_CACHE,
            'file': {'driver': 'file', 'filename': path,
                     'node-name': f'{node}-file', 'cache': REPLICA_CACHE}})
        self._pool.append((node, path))

    async def _cancel_tasks(self) -> None:
        for task in (self._pool_task, self._merge_task):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._pool_task = self._merge_task = None

    async def _quit(self) -> None:
        if self.server is not None:
            return      # the server's qsd: it quits it
        if self.monitor is not None:
            # QEMU closes the socket as it quits: the reply may never come.
            with contextlib.suppress(MonitorError, TimeoutError):
                await asyncio.wait_for(self.monitor.execute('quit'), 5)
            await self.monitor.close()
        if self.process is not None:
            try:
                await asyncio.wait_for(self.process.wait(), 5)
            except TimeoutError:
                LOG.warning('qsd did not quit: killing it')
                await self.process.kill()


# -- primary: disk-sync plugins --------------------------------------------

class DiskSync(abc.ABC):
    """Keeps the secondary's replica in step with the primary's disk.

    ``failed`` is set (and ``on_failure`` called with the reason) when the
    replication broke: the engine then treats the secondary as lost. An
    epoch during which replication failed must not be committed, so
    :meth:`checkpoint` raises :class:`DiskError` once ``failed`` is set.
    """

    REPLICA = 'replica'     # the nbd node on the primary
    #: (subclasses': their block job, their dirty bitmap)
    JOB = ''
    BITMAP = ''

    def __init__(self, monitor: Monitor, node: str = 'disk0',
                 index: int = 0) -> None:
        self.monitor = monitor
        self.node = node
        #: which of the guest's disks (0: the first); names this sync's
        #: nodes and jobs apart from the other disks'
        self.index = index
        if index:
            self.REPLICA = f'replica{index}'
            self.JOB = f'repl{index}'
            self.BITMAP = f'mftvm-bc{index}'
        self.failed = asyncio.Event()
        self.failure: Optional[str] = None
        self.on_failure: Optional[Callable[[str], None]] = None
        self.stop_timeout = 10.0
        #: what the first sync copies: ``full``, the whole disk, or
        #: ``top``, only its top image (a shared image's buffer,
        #: :class:`~.volume.VolumeBuffer`: the replica's base is the
        #: image itself)
        self.initial_sync = 'full'
        self._stats: dict[str, Any] = {'sync_s': None}

    @abc.abstractmethod
    async def start(self, target: NbdTarget) -> None:
        """Sync the running guest's disk to ``target``; return when synced."""

    @abc.abstractmethod
    async def checkpoint(self, epoch: int) -> None:
        """Inside the pause of ``epoch``, after ``stop``: finish the epoch.

        It runs before the device-state save starts, whose end
        inactivates the block nodes: when it returns, no job of this
        sync may have a write left to do (see :mod:`.epoch`)."""

    async def stop(self) -> None:
        """Stop replicating; never hangs on a dead peer. Idempotent."""
        try:
            await asyncio.wait_for(self._stop(), self.stop_timeout)
        except TimeoutError:
            raise DiskError(f'disk sync did not stop within '
                            f'{self.stop_timeout}s') from None

    @abc.abstractmethod
    async def _stop(self) -> None:
        ...

    def stats(self) -> dict[str, Any]:
        return dict(self._stats, failed=self.failed.is_set(),
                    failure=self.failure)

    def _fail(self, reason: str) -> None:
        if self.failed.is_set():
            return
        LOG.error('disk replication of %s failed: %s', self.node, reason)
        self.failure = reason
        self.failed.set()
        if self.on_failure is not None:
            self.on_failure(reason)

    async def _add_replica(self, target: NbdTarget) -> None:
        await self.monitor.execute('blockdev-add', **{
            'driver': 'nbd', 'node-name': self.REPLICA,
            'server': target.qmp_server(), 'export': target.export,
            # A dead peer fails requests at once instead of stalling the
            # guest while QEMU tries to reconnect.
            'reconnect-delay': 0, **target.qmp_tls()})

    async def _end_job(self, job: str) -> None:
        info = await job_info(self.monitor, job)
        if info is not None and info['status'] not in _DONE:
            # force: a ready mirror would otherwise try to converge first.
            await quietly(self.monitor, 'block-job-cancel', device=job,
                           force=True)
            info = await wait_job(self.monitor, job, _DONE,
                                  self.stop_timeout)
        if info is not None:
            await quietly(self.monitor, 'job-dismiss', id=job)


class WriteReplication(DiskSync):
    """Every guest write goes to both disks (write-blocking mirror).

    The mirror job ``repl0`` does the initial sync, becomes ``ready`` and
    is never completed. A watcher waits for its status changes (and looks
    at it every ``recheck_interval`` s anyway) and sets ``failed`` when it
    ends or errors.
    """

    JOB = 'repl0'
    COPY_MODE = 'write-blocking'
    #: bytes the mirror tracks dirty data by (None: QEMU's default, the
    #: cluster size); a synchronous mirror never leaves any
    GRANULARITY: Optional[int] = None

    def __init__(self, monitor: Monitor, node: str = 'disk0',
                 index: int = 0) -> None:
        super().__init__(monitor, node, index)
        self.recheck_interval = 2.0
        self.sync_timeout: Optional[float] = None
        self._watch: Optional[asyncio.Task[None]] = None
        self._active = False

    async def start(self, target: NbdTarget) -> None:
        t0 = time.perf_counter()
        await self._add_replica(target)
        self._active = True
        args: dict[str, Any] = {
            'job-id': self.JOB, 'device': self.node,
            'target': self.REPLICA, 'sync': self.initial_sync,
            'copy-mode': self.COPY_MODE,
            # A write the replica refuses (its overlays' filesystem full:
            # qsd's NBD server answers ENOSPC) ends the job with the
            # error, which makes the secondary lost; the guest's own
            # write has completed on its disk. (QEMU's default, said
            # here: "stop" or "enospc" would leave the job paused and
            # the replica silently behind.)
            'on-target-error': 'report',
            # Keep a failed job around so we can read its error.
            'auto-dismiss': False}
        if self.GRANULARITY:
            args['granularity'] = self.GRANULARITY
        try:
            await self.monitor.execute('blockdev-mirror', **args)
            info = await wait_job(self.monitor, self.JOB,
                                  frozenset({'ready'}), self.sync_timeout)
            if info is None or info['status'] != 'ready':
                raise DiskError(f'initial disk sync failed: '
                                f'{(info or {}).get("error", "job vanished")}')
        except BaseException:
            await self.stop()
            raise
        self._stats['sync_s'] = time.perf_counter() - t0
        self._watch = asyncio.create_task(self._watch_job())

    async def checkpoint(self, epoch: int) -> None:
        # Writes are already on the replica: nothing to copy.
        if self.failed.is_set():
            raise DiskError(f'epoch {epoch}: disk replication failed: '
                            f'{self.failure}')

    async def _watch_job(self) -> None:
        def about_it(event: Event) -> bool:
            return (event.get('data') or {}).get('id') == self.JOB
        with self.monitor.events('JOB_STATUS_CHANGE') as events:
            while True:
                try:
                    info = await job_info(self.monitor, self.JOB)
                except MonitorError as exc:
                    LOG.warning('cannot watch disk replication: %s', exc)
                    return
                if info is None:
                    self._fail('the mirror job vanished')
                    return
                if info['status'] in _DONE or info.get('error'):
                    self._fail(info.get('error') or
                               f'the mirror job ended ({info["status"]})')
                    return
                # No event within the interval: look again all the same.
                with contextlib.suppress(MonitorError):
                    await events.wait(about_it, self.recheck_interval)

    async def _stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        if not self._active:
            return
        await self._end_job(self.JOB)
        await quietly(self.monitor, 'blockdev-del',
                       **{'node-name': self.REPLICA})
        self._active = False


class AsyncReplication(WriteReplication):
    """Guest writes go to the replica as they happen, but asynchronously;
    each checkpoint waits for what is still on its way.

    A write-blocking mirror makes every guest write wait for the
    replica's answer, yet only a *committed* epoch's writes count on the
    secondary (a failover drops the rest). So the mirror here copies in
    the background (``copy-mode=background``, dirty data tracked per
    4 KiB) and keeps up with the guest during the epoch; inside the pause
    (the guest is stopped, its I/O drained) :meth:`checkpoint` wakes the
    job and waits until nothing is dirty or in flight. Only then does the
    epoch's mark go out, so its overlay holds every write of the epoch,
    and the device-state save start (its end inactivates the replica's
    node too: a mirror write after it would abort QEMU).
    The pause grows by the tail of the epoch's writes; guest writes no
    longer wait for the network.

    **Back-pressure.** A guest that writes faster than the replica path
    takes leaves the mirror a backlog that grows from epoch to epoch. So
    the checkpoint holds the guest (it is stopped in the pause) as long
    as the replica still takes writes, up to ``drain_timeout``, and gives
    the replica up only when it takes nothing for ``stall_timeout``; and
    each checkpoint paces the guest's writes to its drive
    (``block_set_io_throttle``) by the backlog it found: one more than
    twice what the replica takes in ``TARGET_DRAIN_S`` (at the rate it
    drained in the pauses) lowers the write limit in proportion; a
    backlog under half that raises it, and it is lifted once it is well
    above what the replica takes. Stopping the sync lifts it.
    """

    COPY_MODE = 'background'
    GRANULARITY = 4096
    #: the disk's part of a pause that pacing aims for
    TARGET_DRAIN_S = 0.05
    #: a backlog no larger than this never slows the guest
    MIN_BACKLOG = 1 << 20
    #: the least a paced guest may write per second
    MIN_WRITE_BPS = 1 << 20

    def __init__(self, monitor: Monitor, node: str = 'disk0',
                 index: int = 0) -> None:
        super().__init__(monitor, node, index)
        #: the longest a checkpoint holds the guest for the replica to
        #: catch up
        self.drain_timeout = 10.0
        #: the longest it waits while the replica takes nothing at all
        self.stall_timeout = 2.0
        #: the guest's drive (its qdev), whose writes are paced; None:
        #: not found, or it refused a limit (the guest is never paced)
        self.device: Optional[str] = None
        #: the guest's write limit in bytes/s (None: none)
        self.write_limit: Optional[int] = None
        #: what the replica takes, bytes/s, as measured in the pauses
        self._rate: Optional[float] = None
        self._stats.update(last_drain_ms=None, max_drain_ms=None,
                           last_backlog=None, write_limit_bps=None,
                           paced_epochs=0)

    async def start(self, target: NbdTarget) -> None:
        # (before the mirror puts its filter node above ours)
        self.device = await self._guest_device()
        await super().start(target)

    async def _guest_device(self) -> Optional[str]:
        """The device whose drive's root is our node, or None."""
        try:
            backends = await self.monitor.execute('query-block')
        except MonitorError as exc:
            LOG.warning('the guest\'s writes cannot be paced: %s', exc)
            return None
        for backend in backends if isinstance(backends, list) else ():
            inserted = backend.get('inserted') or {}
            if inserted.get('node-name') == self.node and backend.get('qdev'):
                return str(backend['qdev'])
        LOG.info('no device on %s: the guest\'s writes are not paced',
                 self.node)
        return None

    async def checkpoint(self, epoch: int) -> None:
        await super().checkpoint(epoch)
        t0 = time.perf_counter()
        # Setting the speed wakes a job that sleeps between iterations.
        await self.monitor.execute('block-job-set-speed', device=self.JOB,
                                   speed=0)
        backlog: Optional[int] = None
        least, taking = None, t0
        # QEMU announces no drained mirror (BLOCK_JOB_READY comes once, at
        # the first convergence): poll, a millisecond apart, in the pause.
        while True:
            job = None
            for entry in await self.monitor.execute('query-block-jobs'):
                if entry.get('device') == self.JOB:
                    job = entry
            if job is None or job.get('status') in _DONE:
                self._fail('the mirror job ended')
                raise DiskError(f'epoch {epoch}: disk replication failed: '
                                f'{self.failure}')
            # len - offset: bytes dirty or in flight (QEMU counts both)
            left = int(job['len']) - int(job['offset'])
            if backlog is None:
                backlog = left
            if left <= 0:
                break
            now = time.perf_counter()
            if least is None or left < least:
                least, taking = left, now
            if now - t0 > self.drain_timeout:
                self._fail(f'the replica did not catch up within '
                           f'{self.drain_timeout:.1f}s')
                raise DiskError(f'epoch {epoch}: {self.failure}')
            if now - taking > self.stall_timeout:
                self._fail(f'the replica did not catch up: it took no '
                           f'write for {self.stall_timeout:.1f}s')
                raise DiskError(f'epoch {epoch}: {self.failure}')
            await asyncio.sleep(0.001)
        took = time.perf_counter() - t0
        ms = took * 1000
        self._stats['last_drain_ms'] = round(ms, 2)
        self._stats['max_drain_ms'] = round(
            max(ms, self._stats['max_drain_ms'] or 0), 2)
        self._stats['last_backlog'] = backlog
        await self._pace(backlog or 0, took)

    async def _pace(self, backlog: int, took: float) -> None:
        """Set the guest's write limit by the backlog this pause found."""
        if backlog >= self.MIN_BACKLOG and took > 0:
            rate = backlog / took
            self._rate = rate if self._rate is None \
                else (self._rate + rate) / 2
        if self.device is None or self._rate is None:
            return
        target = max(self.MIN_BACKLOG, self._rate * self.TARGET_DRAIN_S)
        limit = self.write_limit
        new: Optional[int]
        if backlog > 2 * target:
            # In proportion to how far behind the replica is (at most 4×
            # slower at once, so that one burst does not stall the guest).
            base = limit if limit is not None else self._rate
            new = max(self.MIN_WRITE_BPS,
                      int(base * max(0.25, target / backlog)))
        elif limit is not None and backlog < target / 2:
            new = limit * 2
            if new >= 4 * self._rate:
                new = None          # caught up: writes go at their pace
        else:
            return
        if new != limit:
            await self._set_write_limit(new)
        if self.write_limit is not None:
            self._stats['paced_epochs'] += 1

    async def _set_write_limit(self, limit: Optional[int]) -> None:
        assert self.device is not None
        try:
            await self.monitor.execute(
                'block_set_io_throttle', id=self.device, bps=0, bps_rd=0,
                bps_wr=limit or 0, iops=0, iops_rd=0, iops_wr=0)
        except MonitorError as exc:
            LOG.warning('cannot pace the guest\'s writes to %s: %s',
                        self.device, exc)
            self.device = None
            return
        LOG.info('guest writes to %s: %s', self.device,
                 'no limit' if limit is None
                 else f'at most {limit / 2**20:.1f} MiB/s')
        self.write_limit = limit
        self._stats['write_limit_bps'] = limit

    async def _stop(self) -> None:
        # The guest runs on unprotected, or is stopped: at its own pace.
        if self.write_limit is not None and self.device is not None:
            with contextlib.suppress(MonitorError):
                await self._set_write_limit(None)
        await super()._stop()


class BlockCopy(DiskSync):
    """MFTVM 3's way: copy the epoch's dirty blocks inside each pause.

    Each copy is a backup job that ends (and is dismissed) inside
    :meth:`checkpoint`, before the device-state save: QEMU cannot
    inactivate its nodes at the save's end while a backup job runs,
    and the save would fail."""

    BITMAP = 'mftvm-bc0'

    def __init__(self, monitor: Monitor, node: str = 'disk0',
                 index: int = 0) -> None:
        super().__init__(monitor, node, index)
        self.sync_timeout: Optional[float] = None
        self.copy_timeout = 60.0
        self._active = False
        self._job: Optional[str] = None
        self._stats.update(last_copy_ms=None, max_copy_ms=None, copies=0)

    async def start(self, target: NbdTarget) -> None:
        t0 = time.perf_counter()
        await self._add_replica(target)
        self._active = True
        self._job = 'bc-full' if not self.index else f'bc{self.index}-full'
        try:
            # One transaction: every write after the full copy's start
            # point is in the bitmap, every write before is in the copy.
            await self.monitor.execute('transaction', actions=[
                {'type': 'block-dirty-bitmap-add',
                 'data': {'node': self.node, 'name': self.BITMAP}},
                {'type': 'blockdev-backup',
                 'data': {'job-id': self._job, 'device': self.node,
                          'target': self.REPLICA,
                          'sync': self.initial_sync,
                          'auto-dismiss': False}}])
            await self._finish(self._job, self.sync_timeout)
        except BaseException:
            await self.stop()
            raise
        self._stats['sync_s'] = time.perf_counter() - t0

    async def checkpoint(self, epoch: int) -> None:
        if self.failed.is_set():
            raise DiskError(f'epoch {epoch}: disk copy failed: '
                            f'{self.failure}')
        t0 = time.perf_counter()
        self._job = f'bc{epoch}' if not self.index \
            else f'bc{self.index}-{epoch}'
        try:
            await self.monitor.execute('blockdev-backup', **{
                'job-id': self._job, 'device': self.node,
                'target': self.REPLICA, 'sync': 'incremental',
                'bitmap': self.BITMAP, 'bitmap-mode': 'on-success',
                'auto-dismiss': False})
            await self._finish(self._job, self.copy_timeout)
        except (MonitorError, DiskError) as exc:
            self._fail(str(exc))
            raise DiskError(f'epoch {epoch}: disk copy failed: {exc}') \
                from exc
        ms = (time.perf_counter() - t0) * 1000
        self._stats['copies'] += 1
        self._stats['last_copy_ms'] = ms
        self._stats['max_copy_ms'] = max(self._stats['max_copy_ms'] or 0, ms)

    async def _finish(self, job: str, timeout: Optional[float]) -> None:
        info = await wait_job(self.monitor, job, _DONE, timeout)
        await quietly(self.monitor, 'job-dismiss', id=job)
        self._job = None
        if info is not None and info.get('error'):
            raise DiskError(f'{job}: {info["error"]}')

    async def _stop(self) -> None:
        if not self._active:
            return
        if self._job is not None:
            await self._end_job(self._job)
            self._job = None
        await quietly(self.monitor, 'block-dirty-bitmap-remove',
                       node=self.node, name=self.BITMAP)
        await quietly(self.monitor, 'blockdev-del',
                       **{'node-name': self.REPLICA})
        self._active = False


def load_disk_sync(name: str, monitor: Monitor,
                   node: str = 'disk0', index: int = 0) -> DiskSync:
    """The disk-sync plugin ``name`` (one of
    :func:`~mftvm_openstack.contract.plugins.disk_sync_choices`) for the
    disk ``node``, the guest's disk ``index``; DiskError if it is unknown
    or cannot be loaded."""
    cls: type[DiskSync] = load_plugin_class(
        plugins.DISK_SYNC_NAMESPACE, name, kind='disk sync', base=DiskSync,
        error=DiskError)
    if index:
        return cls(monitor, node, index)  # type: ignore[call-arg]
    return cls(monitor, node)
