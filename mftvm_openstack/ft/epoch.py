"""One epoch's checkpoint: taken on the primary, applied on the secondary.

Primary, inside the pause (the guest is stopped from ``stop`` to
``cont`` only; the branches run concurrently)::

    stop ─┬─ disks settle ─┬─ device state ─┬─ cont
          │                └─ disk mark ────┤
          └─ RAM delta ─────────────────────┘

Device state comes from a migration with ``x-ignore-shared`` (guest RAM
lives in a shared file, so the stream carries only device state and
ROMs) into a unix socket we listen on. The end of that migration
*inactivates* every block node of QEMU (it hands the disks over, as to a
destination), until ``cont`` takes them back. So the disks' own part of
the epoch (an asynchronous mirror's last writes, the baseline's copy of
the dirty blocks) must be over before it starts: a mirror write after it
aborts QEMU (``bdrv_co_write_req_prepare: Assertion
'!(bs->open_flags & BDRV_O_INACTIVE)'``), and a backup job still running
makes the inactivation, and so the save, fail. The RAM delta runs beside
all of it: the pause is the longest path, not the sum.

Secondary: :class:`ReplicaImage` keeps the RAM image and the device state
of the last committed epoch; :func:`restore` starts a QEMU from them.

Example::

    capturer = CheckpointCapturer(monitor, tracker, workdir)
    await capturer.setup()
    ckpt = await capturer.capture(epoch, mark=..., settle=...)  # paused inside
    replica.apply(ckpt.epoch, ckpt.devstate, ckpt.delta)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import mmap
import os
import time
from collections.abc import Awaitable, Callable
from typing import Optional

import numpy as np

from mftvm_openstack.files import write_private
from mftvm_openstack.ft import vm
from mftvm_openstack.ft.capacity import create_ram_file
from mftvm_openstack.ft.monitor import (
    MIGRATION_ENDED,
    EventStream,
    Monitor,
    MonitorError,
    QMPMonitor,
)
from mftvm_openstack.ft.trackers import PAGE_SIZE, DirtyTracker, RamDelta


class CheckpointError(Exception):
    """A checkpoint could not be taken; the guest has been resumed."""


@dataclasses.dataclass
class Checkpoint:
    epoch: int
    devstate: bytes
    delta: RamDelta
    pause_s: float
    devstate_s: float
    ram_s: float
    mark_s: float


async def _resume(monitor: Monitor) -> None:
    """After a failed checkpoint: end a migration left running, resume."""
    for command in ('migrate_cancel', 'cont'):
        with contextlib.suppress(MonitorError):
            await monitor.execute(command)


class CheckpointCapturer:
    """Takes checkpoints of one running guest through its monitor."""

    def __init__(self, monitor: Monitor, tracker: DirtyTracker,
                 workdir: str) -> None:
        self.monitor = monitor
        self.tracker = tracker
        self.sock_path = os.path.join(workdir, 'devstate.sock')
        self.devstate_timeout = 5.0
        #: how long the end of a migration whose stream has ended may
        #: take to be announced
        self.end_timeout = 0.2

    async def setup(self) -> None:
        await self.monitor.execute(
            'migrate-set-capabilities', capabilities=[
                {'capability': 'x-ignore-shared', 'state': True},
                # MIGRATION events: the end of each device-state stream
                # is announced rather than asked for.
                {'capability': 'events', 'state': True}])
        # The default bandwidth cap would stretch a 300 KB stream to ms.
        await self.monitor.execute('migrate-set-parameters',
                                   **{'max-bandwidth': 1 << 40})
        self.tracker.start()

    async def _device_state(self) -> bytes:
        """Migrate device state into a socket of ours; return the bytes."""
        chunks: list[bytes] = []
        done = asyncio.get_running_loop().create_future()

        async def on_conn(reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(1 << 20):
                    chunks.append(data)
                if not done.done():
                    done.set_result(None)
            except Exception as exc:
                if not done.done():
                    done.set_exception(exc)
            finally:
                writer.close()

        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock_path)
        server = await asyncio.start_unix_server(on_conn, self.sock_path)
        try:
            with self.monitor.events('MIGRATION') as events:
                await self.monitor.execute('migrate',
                                           uri=f'unix:{self.sock_path}')
                # ~0.4 MB that takes 10-60 ms: seconds mean something is
                # wrong, and the guest is stopped meanwhile.
                await asyncio.wait_for(done, self.devstate_timeout)
                status = await self._migration_end(events)
            if status != 'completed':
                raise CheckpointError(f'device-state migration ended in '
                                      f'state {status!r}')
        finally:
            server.close()
        return b''.join(chunks)

    async def _migration_end(self, events: EventStream) -> str:
        # The stream's EOF comes when QEMU closes it, just before (or just
        # after) it announces the end: the event is usually queued by now,
        # which spares the pause a query-migrate round trip.
        try:
            event = await events.wait(
                lambda e: e['data'].get('status') in MIGRATION_ENDED,
                timeout=self.end_timeout)
            return str(event['data']['status'])
        except MonitorError:
            # No announcement (a monitor that dropped it): ask.
            status = str((await self.monitor.execute('query-migrate')).get(
                'status', ''))
            return status if status in MIGRATION_ENDED else 'timeout'

    async def capture(self, epoch: int,
                      mark: Callable[[int], Awaitable[None]],
                      on_stopped: Optional[Callable[[int], None]] = None,
                      resume: bool = True,
                      settle: Optional[Callable[[int], Awaitable[None]]]
                      = None) -> Checkpoint:
        """Stop, take everything of ``epoch``, resume; return the checkpoint.

        ``settle(epoch)`` finishes the disks' part of the epoch (the disk
        sync's checkpoint): it runs first, and both the device-state save
        (whose end inactivates the block nodes) and ``mark(epoch)``,
        which sets the disk epoch boundary on the secondary, start only
        once it is done. ``on_stopped`` runs right after the guest
        stopped (output commit seals the epoch there). ``resume=False``
        leaves the guest stopped (the last checkpoint of a planned
        handover). The checkpoint's ``mark_s`` is the disks' whole part,
        settle and mark.
        """
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        await self.monitor.execute('stop')
        if on_stopped is not None:
            on_stopped(epoch)
        timings: dict[str, float] = {}

        async def timed(name: str, aw: Awaitable[object]) -> object:
            start = time.perf_counter()
            result = await aw
            timings[name] = time.perf_counter() - start
            return result

        async def disks_then_devstate() -> object:
            start = time.perf_counter()
            if settle is not None:
                await settle(epoch)
            settled = time.perf_counter() - start
            devstate, _ = await asyncio.gather(
                timed('dev', self._device_state()),
                timed('mark', mark(epoch)))
            timings['mark'] += settled
            return devstate

        try:
            devstate, delta = await asyncio.gather(
                disks_then_devstate(),
                timed('ram', loop.run_in_executor(None, self.tracker.collect)))
        except BaseException as exc:
            await _resume(self.monitor)
            if isinstance(exc, (CheckpointError, asyncio.CancelledError)):
                raise
            raise CheckpointError(
                f'checkpoint {epoch} failed: {exc!r}') from exc
        if resume:
            await self.monitor.execute('cont')
        pause = time.perf_counter() - t0
        assert isinstance(devstate, bytes) and isinstance(delta, RamDelta)
        return Checkpoint(epoch, devstate, delta, pause, timings['dev'],
                          timings['ram'], timings['mark'])


class ReplicaDamaged(Exception):
    """The replica holds part of an epoch: it must never be resumed."""


@dataclasses.dataclass(frozen=True)
class Staged:
    """A checkpoint received whole and held where a failover will use it:
    its device state in its own file, its RAM pages in memory, checked
    against the image (:meth:`ReplicaImage.stage`)."""

    epoch: int
    devstate_path: str
    delta: RamDelta


class ReplicaImage:
    """The secondary's copy of guest RAM and device state.

    A checkpoint goes in in two steps, so that the secondary can
    acknowledge it as soon as it is held for good (``stage``) and apply
    it after the ACK (``install``)::

        staged = replica.stage(epoch, devstate, delta)   # may fail: no ACK
        ... send ACK epoch ...
        replica.install(staged)                         # cannot fail for
                                                        # want of anything

    ``stage`` does everything that can fail: it checks the image is whole,
    the epoch no older than any staged, every page inside guest RAM, and
    writes the device state to a file of its own
    (``devstate-<epoch>.bin``; the one write that can find its disk
    full). The image is not touched: after a failed stage it is still
    whole at ``committed``.

    ``install`` only copies the pages into the RAM file (allocated in full
    at creation, so no write can find it full) and then names the staged
    file as :attr:`devstate_path`: no system call that could fail stands
    between the ACK and the epoch's being whole, and the previous epoch's
    file is removed only after (a failure there loses nothing).
    ``committed`` names an epoch only once its RAM pages and its device
    state are both in place. From the first page until then, ``damaged``
    says which epoch is half in; an install cut short leaves it set, and
    the image is never resumed (:meth:`check_whole`), rather than a guest
    run from the RAM of two epochs.

    ``apply`` is both steps at once.
    """

    def __init__(self, ram_file: str, size: int, workdir: str,
                 what: str = 'the replica of guest RAM') -> None:
        self.ram_file = ram_file
        self.size = size
        #: the device state of epoch ``committed`` (staged files go beside
        #: it)
        self.devstate_path = os.path.join(workdir, 'devstate.bin')
        self.committed = 0
        #: the newest epoch staged (installed or not)
        self.staged = 0
        #: why the image mixes two epochs (None: it is whole)
        self.damaged: Optional[str] = None
        #: device-state files staged and not installed yet
        self._pending: set[str] = set()
        #: why an install failed (None: none did); ``damaged`` also names
        #: an install under way
        self._broken: Optional[str] = None
        fd = create_ram_file(ram_file, size, what)
        try:
            self._map = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self._pages = np.frombuffer(self._map, np.uint8).reshape(
            -1, PAGE_SIZE)

    def _staged_path(self, epoch: int) -> str:
        return os.path.join(os.path.dirname(self.devstate_path),
                            f'devstate-{epoch}.bin')

    def stage(self, epoch: int, devstate: bytes, delta: RamDelta) -> Staged:
        """Check checkpoint ``epoch`` against the image and write its
        device state to a file of its own; the image is not touched.

        It may run while an earlier epoch installs (``damaged`` names
        that one meanwhile): only an install that failed refuses it."""
        if self._broken is not None:
            raise ReplicaDamaged(f'the replica is unusable: {self._broken}')
        if epoch < self.staged:
            raise ValueError(f'checkpoint {epoch} after checkpoint '
                             f'{self.staged}: epochs must not go back')
        if delta.pages.shape != (len(delta.indices), PAGE_SIZE):
            raise ValueError(f'checkpoint {epoch}: {len(delta.indices)} '
                             f'page numbers for pages of shape '
                             f'{delta.pages.shape}')
        if len(delta.indices) and int(delta.indices.max()) >= len(
                self._pages):
            raise ValueError(f'checkpoint {epoch} writes beyond guest RAM')
        path = self._staged_path(epoch)
        write_private(path, devstate)
        self._pending.add(path)
        self.staged = epoch
        return Staged(epoch, path, delta)

    def install(self, staged: Staged) -> None:
        """Make the staged epoch the image's: its pages, then its device
        state. Epochs install in the order they were staged."""
        self.check_whole()
        if staged.epoch < self.committed:
            raise ValueError(f'checkpoint {staged.epoch} installed after '
                             f'checkpoint {self.committed}')
        self.damaged = (f'checkpoint {staged.epoch} was cut short after its '
                        f'first RAM pages were written over epoch '
                        f'{self.committed}')
        try:
            self._pages[staged.delta.indices] = staged.delta.pages
        except BaseException as exc:
            self.damaged = self._broken = (
                f'applying checkpoint {staged.epoch} failed after its '
                f'first RAM pages were written over epoch '
                f'{self.committed}: {exc!r}')
            raise
        previous, self.devstate_path = self.devstate_path, \
            staged.devstate_path
        self._pending.discard(staged.devstate_path)
        self.damaged = None
        self.committed = staged.epoch
        with contextlib.suppress(OSError):
            os.unlink(previous)

    def apply(self, epoch: int, devstate: bytes, delta: RamDelta) -> None:
        """Stage and install checkpoint ``epoch`` at once."""
        self.install(self.stage(epoch, devstate, delta))

    def check_whole(self) -> None:
        """ReplicaDamaged if the image mixes two epochs."""
        if self.damaged is not None:
            raise ReplicaDamaged(f'the replica is unusable: {self.damaged}')

    def close(self) -> None:
        """Unmap the RAM; remove staged device states that were never
        installed (the committed one stays: the restore reads it)."""
        for path in self._pending:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._pending.clear()
        self._pages = np.zeros((0, PAGE_SIZE), np.uint8)
        with contextlib.suppress(BufferError):
            self._map.close()


async def restore(spec: vm.GuestSpec, paths: vm.Paths, ram_file: str,
                  devstate_path: str,
                  disk_layers: list[tuple[str, str]],
                  disk_chains: Optional[list[list[tuple[str, str]]]] = None,
                  ) -> tuple[vm.ChildProcess, QMPMonitor]:
    """Start a QEMU from a replica and run the guest on from it.

    The new QEMU maps ``ram_file`` as guest RAM (so it is not copied),
    runs on ``disk_layers`` (its first disk's chain) or ``disk_chains``
    (every disk's), loads the device state, resumes the guest and
    announces every NIC's MAC.
    """
    argv = vm.qemu_argv(spec, paths, ram_file, disk_layers, incoming=True,
                        disk_chains=disk_chains)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(paths.qmp)
    proc = await vm.ChildProcess.start(argv, paths.log)
    try:
        monitor = await QMPMonitor.connect(paths.qmp, 'restored-qemu', 30)
    except MonitorError:
        await proc.kill()
        raise MonitorError(f'restored QEMU did not start: '
                           f'{proc.last_log_line()}') from None
    try:
        await monitor.execute('migrate-set-capabilities', capabilities=[
            {'capability': 'x-ignore-shared', 'state': True},
            {'capability': 'events', 'state': True}])
        with monitor.events('MIGRATION') as events:
            await monitor.execute('migrate-incoming', uri=f'exec:cat '
                                  f'{devstate_path}')
            await events.wait(lambda e: e['data'].get('status') in
                              MIGRATION_ENDED, timeout=60)
        status = await monitor.execute('query-migrate')
        if status.get('status') != 'completed':
            raise MonitorError(f'device state did not load: {status}')
        await monitor.execute('cont')
        for i, forwards in enumerate(spec.nic_forwards):
            for fwd in forwards:
                reply = await monitor.execute(
                    'human-monitor-command', **{
                        'command-line': f'hostfwd_add {vm.netdev_id(i)} '
                                        f'{fwd.qemu()}'})
                if reply:
                    raise MonitorError(f'port forward {fwd.qemu()}: '
                                       f'{reply}')
        await monitor.execute('announce-self', initial=50, max=550,
                              rounds=5, step=100)
    except BaseException:
        await monitor.close()
        await proc.kill()
        raise
    return proc, monitor
