"""Dirty trackers: which guest pages changed since the last checkpoint.

A tracker looks at the guest's shared RAM file and, inside the checkpoint
pause, returns the changed pages *and their contents* (a copy: the guest
runs on as soon as the pause ends). Trackers are stevedore plugins in the
namespace ``mftvm.ft.trackers``:

``scan``
    Keeps a shadow copy of RAM and compares page by page. Works on every
    host; its cost grows with RAM size.
``soft-dirty``
    Reads the kernel's soft-dirty bits of QEMU's mapping from
    ``/proc/PID/pagemap`` and clears them through ``clear_refs``. Its cost
    grows with the dirty pages only; it needs CONFIG_MEM_SOFT_DIRTY.

Example::

    tracker = load_tracker('auto', ram_file, size, qemu_pid)
    tracker.start()                  # before the first checkpoint
    delta = tracker.collect()        # inside each pause
    delta.indices, delta.pages       # page numbers and 4 KiB copies
"""

from __future__ import annotations

import abc
import concurrent.futures
import dataclasses
import logging
import mmap
import os
import struct
from typing import Optional

import numpy as np

from mftvm_openstack.contract import plugins
from mftvm_openstack.ft.plugin_loader import load_plugin_class

LOG = logging.getLogger(__name__)

PAGE_SIZE = 4096
_WORDS = PAGE_SIZE // 8


class TrackerError(Exception):
    """The tracker cannot work on this host; the message says why."""


@dataclasses.dataclass
class RamDelta:
    """Changed pages: page numbers (uint32) and their contents."""

    indices: np.ndarray
    pages: np.ndarray  # shape (n, PAGE_SIZE) uint8

    @property
    def nbytes(self) -> int:
        return int(self.pages.nbytes)

    @classmethod
    def empty(cls) -> RamDelta:
        return cls(np.zeros(0, np.uint32), np.zeros((0, PAGE_SIZE), np.uint8))


def _map(path: str, size: int) -> mmap.mmap:
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, size, prot=mmap.PROT_READ, flags=mmap.MAP_SHARED)
    finally:
        os.close(fd)


class DirtyTracker(abc.ABC):
    """Finds the pages of ``ram_file`` written since the last collect()."""

    def __init__(self, ram_file: str, size: int, qemu_pid: int) -> None:
        self.ram_file = ram_file
        self.size = size
        self.qemu_pid = qemu_pid
        self._map = _map(ram_file, size)
        self.ram = np.frombuffer(self._map, np.uint8).reshape(-1, PAGE_SIZE)

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        """None if the tracker works on this host, else why not."""
        return None

    def start(self) -> None:
        """Prepare (outside any pause). Everything counts as dirty first."""

    @abc.abstractmethod
    def collect(self) -> RamDelta:
        """The pages changed since the last call, copied (guest stopped)."""

    def close(self) -> None:
        self.ram = np.zeros((0, PAGE_SIZE), np.uint8)
        try:
            self._map.close()
        except BufferError:  # a view is still alive somewhere; GC frees it
            pass


class ScanTracker(DirtyTracker):
    """Compare RAM against a shadow copy of the last checkpoint.

    The first collect() returns every non-zero page: the secondary's RAM
    image starts zero-filled, so zero pages need not be shipped. The
    compare runs on two threads (numpy releases the GIL): the guest is
    stopped, so its vCPU cores are free.
    """

    #: pages per compare step: small enough to keep temporaries in cache
    CHUNK = 4096

    def __init__(self, ram_file: str, size: int, qemu_pid: int,
                 threads: int = 2) -> None:
        super().__init__(ram_file, size, qemu_pid)
        self._pool = concurrent.futures.ThreadPoolExecutor(threads)
        self._threads = threads
        self._shadow = np.zeros((0, _WORDS), np.uint64)

    def start(self) -> None:
        npages = self.size // PAGE_SIZE
        self._shadow = np.empty((npages, _WORDS), np.uint64)
        self._shadow.fill(0)  # fault the pages in now, not in a pause

    def _scan(self, first: int, last: int) -> list[np.ndarray]:
        words = self.ram.view(np.uint64)
        found = []
        for lo in range(first, last, self.CHUNK):
            hi = min(last, lo + self.CHUNK)
            changed = np.flatnonzero(
                (words[lo:hi] != self._shadow[lo:hi]).any(axis=1))
            if changed.size:
                changed += lo
                self._shadow[changed] = words[changed]
                found.append(changed)
        return found

    def collect(self) -> RamDelta:
        npages = self._shadow.shape[0]
        step = -(-npages // self._threads)
        parts = self._pool.map(lambda i: self._scan(i, min(npages, i + step)),
                               range(0, npages, step))
        found = [a for part in parts for a in part]
        if not found:
            return RamDelta.empty()
        indices = np.concatenate(found).astype(np.uint32)
        # The shadow already holds the new contents: copy from it, not
        # from RAM, so the delta equals exactly what was compared.
        pages = self._shadow[indices].view(np.uint8).reshape(-1, PAGE_SIZE)
        return RamDelta(indices, pages)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._shadow = np.zeros((0, _WORDS), np.uint64)
        super().close()


_SOFT_DIRTY_BIT = 1 << 55
_PRESENT_BIT = 1 << 63
_SWAPPED_BIT = 1 << 62


def soft_dirty_supported() -> Optional[str]:
    """None if this kernel tracks soft-dirty bits, else the reason."""
    try:
        probe = mmap.mmap(-1, PAGE_SIZE)
    except OSError as exc:
        return f'cannot map a probe page: {exc}'
    try:
        probe[0] = 1
        addr = np.frombuffer(probe, np.uint8).ctypes.data
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('4')
        probe[0] = 2
        with open('/proc/self/pagemap', 'rb') as f:
            f.seek((addr // PAGE_SIZE) * 8)
            (entry,) = struct.unpack('<Q', f.read(8))
        if not entry & _SOFT_DIRTY_BIT:
            return 'the kernel has no CONFIG_MEM_SOFT_DIRTY'
        return None
    except OSError as exc:
        return f'pagemap/clear_refs not usable: {exc}'
    finally:
        probe.close()


def find_mapping(maps_text: str, path: str) -> tuple[int, int]:
    """(start, end) of the mapping of ``path`` in a /proc/PID/maps text."""
    for line in maps_text.splitlines():
        fields = line.split(None, 5)
        if len(fields) == 6 and fields[5] == path:
            start, end = (int(x, 16) for x in fields[0].split('-'))
            return start, end
    raise TrackerError(f'{path} is not mapped by the QEMU process')


def soft_dirty_pages(pagemap: bytes) -> np.ndarray:
    """Page numbers whose pagemap entry has the soft-dirty bit set."""
    entries = np.frombuffer(pagemap, '<u8')
    return np.flatnonzero(entries & np.uint64(_SOFT_DIRTY_BIT)).astype(
        np.uint32)


class SoftDirtyTracker(DirtyTracker):
    """Use the kernel's soft-dirty bits of QEMU's mapping of guest RAM."""

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        return soft_dirty_supported()

    def start(self) -> None:
        with open(f'/proc/{self.qemu_pid}/maps') as f:
            self._start, _ = find_mapping(f.read(), self.ram_file)
        self._first = True

    def _clear(self) -> None:
        with open(f'/proc/{self.qemu_pid}/clear_refs', 'w') as f:
            f.write('4')

    def collect(self) -> RamDelta:
        if self._first:
            # Nothing to compare with yet: ship every non-zero page.
            self._first = False
            self._clear()
            words = self.ram.view(np.uint64)
            indices = np.flatnonzero(words.any(axis=1)).astype(np.uint32)
        else:
            npages = self.size // PAGE_SIZE
            with open(f'/proc/{self.qemu_pid}/pagemap', 'rb') as f:
                f.seek((self._start // PAGE_SIZE) * 8)
                data = f.read(npages * 8)
            self._clear()
            indices = soft_dirty_pages(data)
        return RamDelta(indices, self.ram[indices].copy())


def tracker_class(name: str) -> type[DirtyTracker]:
    """The tracker plugin ``name`` (``auto``: soft-dirty where it works,
    else scan); TrackerError if unknown, broken or unable to run here."""
    if name == plugins.AUTO_TRACKER:
        why_not = SoftDirtyTracker.unavailable_reason()
        picked = ScanTracker if why_not else SoftDirtyTracker
        LOG.info('dirty tracker %s: %s.%s%s', name, picked.__module__,
                 picked.__qualname__, f' ({why_not})' if why_not else '')
        return picked
    cls: type[DirtyTracker] = load_plugin_class(
        plugins.TRACKER_NAMESPACE, name, kind='dirty tracker',
        base=DirtyTracker, error=TrackerError,
        choices=plugins.tracker_choices())
    reason = cls.unavailable_reason()
    if reason:
        raise TrackerError(f'dirty tracker {name} cannot run here: {reason}; '
                           f'use {plugins.AUTO_TRACKER}')
    return cls


def load_tracker(name: str, ram_file: str, size: int,
                 qemu_pid: int) -> DirtyTracker:
    """An instance of :func:`tracker_class` for one guest."""
    return tracker_class(name)(ram_file, size, qemu_pid)
