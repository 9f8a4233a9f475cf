"""Every disk of a guest, replicated in the same epochs.

A guest may have up to :data:`~mftvm_openstack.contract.limits.MAX_DISKS`
disks, named ``disk0`` (its first, or root, disk), ``disk1``, ... The
secondary keeps one :class:`~.disk.EpochOverlayStore` per disk, all in
one ``qemu-storage-daemon`` behind one NBD server (an export per disk);
the primary runs one disk sync per disk. Each set stands in for the one
store or sync the state machines know, so an epoch's mark, commit and
checkpoint reach every disk, and a failover keeps every disk at the same
committed epoch::

    replicas = ReplicaDisks(root, [size0, size1], listen=None, tls=None)
    targets = await replicas.start()      # one NbdTarget per disk
    await replicas.mark(7)                # every disk's overlay, epoch 8
    await replicas.commit(7)
    chains = await replicas.failover_layers(7)   # a layer chain per disk

    syncs = DiskSyncs([load_disk_sync('async-replication', mon, node, i)
                       for i, node in enumerate(nodes)])
    await syncs.start(targets)
    await syncs.checkpoint(epoch)         # inside each pause

A single-disk guest's set holds one store (its files where they always
were) and one sync, under their old names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any, Optional

from mftvm_openstack.contract.spec import disk_name
from mftvm_openstack.ft.disk import (
    DiskError,
    DiskSync,
    EpochOverlayStore,
    NbdServerTls,
    NbdTarget,
)

Chain = list[tuple[str, str]]


def replica_dir(root: str, index: int) -> str:
    """Where disk ``index``'s replica lives under a side's ``root``
    (the first disk's is ``root/disk``, as it always was)."""
    return os.path.join(root, 'disk' if index == 0 else disk_name(index))


class ReplicaDisks:
    """The secondary's replicas of every disk, in one qsd.

    The first disk's store runs the qsd and its NBD server; the others
    share both. Marks go to every disk at once, inside the primary's
    pause; a failover fences every export before it settles any.
    """

    def __init__(self, root: str, sizes: Sequence[int], *,
                 listen: Optional[tuple[str, int]] = None,
                 tls: Optional[NbdServerTls] = None,
                 store_class: type[EpochOverlayStore] = EpochOverlayStore,
                 **store_args: Any) -> None:
        if not sizes:
            raise DiskError('a guest has at least one disk')
        first = store_class(replica_dir(root, 0), sizes[0],
                            listen=listen, tls=tls, **store_args)
        self.stores = [first] + [
            store_class(replica_dir(root, i), size, name=disk_name(i),
                        server=first, **store_args)
            for i, size in enumerate(sizes[1:], 1)]

    @property
    def first(self) -> EpochOverlayStore:
        return self.stores[0]

    async def start(self) -> list[NbdTarget]:
        """Start every store; one target per disk, in order."""
        targets = [await self.first.start()]
        try:
            for store in self.stores[1:]:
                targets.append(await store.start())
        except BaseException:
            await self.stop()
            raise
        return targets

    async def mark(self, epoch: int) -> None:
        await self._each(lambda s: s.mark(epoch))

    async def commit(self, epoch: int) -> None:
        await self._each(lambda s: s.commit(epoch))

    async def stop(self) -> None:
        """Stop every store (the first, which quits the qsd, last)."""
        errors = []
        for store in reversed(self.stores):
            try:
                await store.stop()
            except Exception as exc:     # the rest must go all the same
                errors.append(exc)
        if errors:
            raise errors[0]

    async def failover_layers(self, committed_epoch: int) -> list[Chain]:
        """Every disk's chain at ``committed_epoch``, the first's first.

        Each store checks first that it can give that epoch; the others
        settle before the first, whose qsd they share, quits it."""
        for store in self.stores:
            store.chain.failover(committed_epoch)   # fail before changing
        chains: list[Chain] = [[]] * len(self.stores)
        for i in reversed(range(len(self.stores))):
            chains[i] = await self.stores[i].failover_layers(
                committed_epoch)
        return chains

    def stats(self) -> dict[str, Any]:
        stats = self.first.stats()
        if len(self.stores) > 1:
            stats['disks'] = [s.stats() for s in self.stores]
        return stats

    async def _each(self, call: Callable[[EpochOverlayStore], Any]) -> None:
        # Every disk gets it even when one fails; the first failure is
        # raised (the pair then gives the replica up).
        results = await asyncio.gather(*(call(s) for s in self.stores),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result


class DiskSyncs:
    """The primary's disk syncs, one per disk, as one
    :class:`~mftvm_openstack.ft.pair.interfaces.DiskSync`.

    ``failed`` is set, and ``on_failure`` called once, when any disk's
    replication broke: the secondary is then lost for every disk.
    """

    def __init__(self, syncs: Sequence[DiskSync]) -> None:
        if not syncs:
            raise DiskError('a guest has at least one disk')
        self.syncs = list(syncs)
        self.failed = asyncio.Event()
        self.failure: Optional[str] = None
        self.on_failure: Optional[Callable[[str], None]] = None
        for sync in self.syncs:
            sync.on_failure = self._failed

    def _failed(self, reason: str) -> None:
        if self.failed.is_set():
            return
        self.failure = reason
        self.failed.set()
        if self.on_failure is not None:
            self.on_failure(reason)

    async def start(self, targets: Sequence[NbdTarget]) -> None:
        """Sync every disk to its target (at once); on any failure every
        sync is stopped and the error raised."""
        if len(targets) != len(self.syncs):
            raise DiskError(f'{len(self.syncs)} disks, but '
                            f'{len(targets)} replica targets')
        results = await asyncio.gather(
            *(s.start(t) for s, t in zip(self.syncs, targets)),
            return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            with contextlib.suppress(DiskError):
                await self.stop()
            raise failed[0]

    async def checkpoint(self, epoch: int) -> None:
        results = await asyncio.gather(
            *(s.checkpoint(epoch) for s in self.syncs),
            return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def stop(self) -> None:
        errors = []
        for sync in self.syncs:
            try:
                await sync.stop()
            except DiskError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def stats(self) -> dict[str, Any]:
        stats = self.syncs[0].stats()
        if len(self.syncs) > 1:
            stats['disks'] = [s.stats() for s in self.syncs]
            stats['failed'] = self.failed.is_set() or stats['failed']
        return stats
