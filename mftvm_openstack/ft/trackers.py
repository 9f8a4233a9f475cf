"""Dirty trackers: which guest pages changed since the last checkpoint.

A tracker looks at the guest's shared RAM file and, inside the checkpoint
pause, returns the changed pages *and their contents* (a copy: the guest
runs on as soon as the pause ends). Trackers are stevedore plugins in the
namespace ``mftvm.ft.trackers``:

``hash``
    Keeps a keyed XXH3-128 hash of every page (16 bytes a page: 0.5 % of
    RAM with its scratch list) and hashes RAM again in each pause: RAM is
    read once. Needs the ``_pagehash`` extension (built on Debian's
    libxxhash). Its cost grows with RAM size.
``scan``
    Keeps a shadow copy of RAM (100 % of RAM more) and compares page by
    page: both copies are read in each pause. Works on every host.
``soft-dirty``
    Reads the kernel's soft-dirty bits of QEMU's mapping from
    ``/proc/PID/pagemap`` and clears them through ``clear_refs``. Its cost
    grows with the dirty pages only; it needs CONFIG_MEM_SOFT_DIRTY.

A page is reported when its contents differ from the last collect();
``hash`` and ``scan`` compare contents, so a page written with the value
it already held is not reported (the secondary holds that value), while
``soft-dirty`` reports every page written. Reporting too many pages costs
bytes; missing one would corrupt the guest after a failover.

Example::

    tracker = load_tracker('auto', ram_file, size, qemu_pid)
    tracker.state_bytes              # what tracking keeps beside RAM
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
from typing import Any, Optional

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

    @property
    def state_bytes(self) -> int:
        """The memory tracking keeps beside guest RAM (after start())."""
        return 0

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

    @property
    def state_bytes(self) -> int:
        return int(self._shadow.nbytes)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._shadow = np.zeros((0, _WORDS), np.uint64)
        super().close()


def _pagehash_module() -> Any:
    """The ``_pagehash`` extension; ImportError where it is not built."""
    from mftvm_openstack.ft import _pagehash
    return _pagehash


class HashTracker(DirtyTracker):
    """Compare each page's hash with its hash at the last checkpoint.

    The hash is XXH3-128 keyed with a secret drawn at construction: a
    change is missed only where two contents of a page collide, which
    for a 128-bit hash is far rarer than a memory error, and the guest
    cannot aim at a collision without the secret. A sum or a CRC would
    not do: rearranging a page's words keeps a sum, and a CRC can be
    kept by chosen changes.

    The first collect() returns every non-zero page (each page's hash
    starts as the zero page's: the secondary's image starts zeroed).
    Hashing runs in C over chunks of RAM on two threads (the guest is
    stopped, so its vCPU cores are free); the changed pages are then
    copied, and the hash kept is that of the copy, so what is stored is
    exactly what was shipped.
    """

    #: pages per hashing task: chunks small enough to share out evenly
    CHUNK = 16384
    #: bytes of the hash key (XXH3's default secret size)
    SECRET_BYTES = 192

    def __init__(self, ram_file: str, size: int, qemu_pid: int,
                 threads: int = 2) -> None:
        super().__init__(ram_file, size, qemu_pid)
        self._c = _pagehash_module()
        self._pool = concurrent.futures.ThreadPoolExecutor(threads)
        self._threads = threads
        self._secret = os.urandom(self.SECRET_BYTES)
        self._hashes = np.zeros((0, 2), np.uint64)
        self._found = np.zeros(0, np.uint32)

    @classmethod
    def unavailable_reason(cls) -> Optional[str]:
        try:
            _pagehash_module()
        except ImportError as exc:
            return (f'the _pagehash extension cannot be loaded ({exc}): '
                    f'reinstall mftvm-openstack with libxxhash-dev')
        return None

    def start(self) -> None:
        npages = self.size // PAGE_SIZE
        zero = np.frombuffer(self._c.page_hash(bytes(PAGE_SIZE),
                                               self._secret), np.uint64)
        self._hashes = np.empty((npages, 2), np.uint64)
        self._hashes[:] = zero
        self._found = np.zeros(npages, np.uint32)  # faulted in now

    @property
    def state_bytes(self) -> int:
        return int(self._hashes.nbytes + self._found.nbytes)

    def _hash(self, first: int, last: int) -> np.ndarray:
        n = self._c.hash_pages(self._map, self._hashes, self._secret,
                               first, last, self._found)
        return self._found[first:first + n]

    def _copy(self, indices: np.ndarray, pages: np.ndarray) -> None:
        self._c.copy_pages(self._map, indices, pages, self._hashes,
                           self._secret)

    def collect(self) -> RamDelta:
        npages = self._hashes.shape[0]
        found = list(self._pool.map(
            lambda lo: self._hash(lo, min(npages, lo + self.CHUNK)),
            range(0, npages, self.CHUNK)))
        indices = np.concatenate(found) if found else np.zeros(0, np.uint32)
        if not indices.size:
            return RamDelta.empty()
        pages = np.empty((indices.size, PAGE_SIZE), np.uint8)
        step = -(-indices.size // self._threads)
        list(self._pool.map(
            lambda lo: self._copy(indices[lo:lo + step],
                                  pages[lo:lo + step]),
            range(0, indices.size, step)))
        return RamDelta(indices, pages)

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        self._hashes = np.zeros((0, 2), np.uint64)
        self._found = np.zeros(0, np.uint32)
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


def auto_tracker() -> tuple[type[DirtyTracker], str]:
    """The tracker ``auto`` picks here, and why the better ones cannot run.

    soft-dirty where the kernel has it (its cost grows with dirty pages
    only), else hash (RAM read once per pause, 0.5 % of RAM kept), else
    scan (a shadow copy: RAM twice).
    """
    why_not: list[str] = []
    for cls in (SoftDirtyTracker, HashTracker):
        reason = cls.unavailable_reason()
        if reason is None:
            return cls, '; '.join(why_not)
        why_not.append(f'{cls.__name__}: {reason}')
    return ScanTracker, '; '.join(why_not)


def tracker_class(name: str) -> type[DirtyTracker]:
    """The tracker plugin ``name`` (``auto``: see :func:`auto_tracker`);
    TrackerError if unknown, broken or unable to run here."""
    if name == plugins.AUTO_TRACKER:
        picked, why_not = auto_tracker()
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
