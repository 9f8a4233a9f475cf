"""Room for a guest: RAM files allocated up front, space checked before.

Guest RAM lives in files on a tmpfs (``/dev/shm``, or ``$MFTVM_RAM_DIR``)
that QEMU and the secondary's replica map shared. A sparse file there is
a promise the tmpfs may not keep: the first write to a page that finds
it full is a SIGBUS that kills whoever wrote it. :func:`create_ram_file`
allocates every page when the file is made, so a full tmpfs is an error
at start and never a signal later::

    fd = create_ram_file('/dev/shm/mftvm-vm0-primary.ram', 128 << 20,
                         'guest vm0 RAM (primary)')

Before a guest is admitted, :func:`check` sums what each filesystem must
hold and refuses, in one line, what does not fit::

    check([Need('/dev/shm', 256 << 20, 'guest vm0 RAM (both sides)'),
           Need('/var/lib/mftvm/vm0/secondary/disk',
                replica_disk_bytes(disk_size), 'the disk replica')])
    # CapacityError: not enough space in /dev/shm for guest vm0 RAM
    # (both sides): needs 256.0 MiB, 100.0 MiB available; ...

The disk replica needs the guest disk's *virtual* size, plus
:data:`OVERLAY_HEADROOM` for the per-epoch overlays: its base becomes a
full copy of whatever the guest has written, and the guest may write all
of its disk. A check is a moment's truth: what fills a filesystem later
is handled where it happens (the secondary is given up, never the guest).
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Iterable

from mftvm_openstack.files import create_private

#: room for the replica's qcow2 overlays (a pool of empty ones, and the
#: writes of the epochs not yet merged into its base) beyond its base
OVERLAY_HEADROOM = 64 << 20


class CapacityError(Exception):
    """Not enough space for a guest; one line that says what to do.

    ``directory``, ``needed`` and ``available`` (bytes) and ``what`` are
    kept for callers that pass the error on (the agent's RPC error).
    """

    def __init__(self, directory: str, needed: int, available: int,
                 what: str) -> None:
        self.directory = directory
        self.needed = needed
        self.available = available
        self.what = what
        super().__init__(
            f'not enough space in {directory} for {what}: needs '
            f'{mib(needed)}, {mib(available)} available; free space '
            f'there or enlarge it (a tmpfs: mount -o remount,size=...), '
            f'or give the guest less memory or a smaller disk')


@dataclasses.dataclass(frozen=True)
class Need:
    """``size`` bytes that ``what`` will take in ``directory``."""

    directory: str
    size: int
    what: str


def mib(size: int) -> str:
    return f'{size / 2**20:.1f} MiB'


def replica_disk_bytes(disk_size: int) -> int:
    """The space a disk replica of ``disk_size`` virtual bytes needs."""
    return disk_size + OVERLAY_HEADROOM


def existing(path: str) -> str:
    """``path``, or its nearest ancestor that exists (where a directory
    not made yet will take its space from)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def available(directory: str) -> int:
    """Bytes an unprivileged writer may still put in ``directory``."""
    st = os.statvfs(existing(directory))
    return st.f_bavail * st.f_frsize


def check(needs: Iterable[Need]) -> None:
    """CapacityError for the first filesystem that cannot hold its share
    of ``needs`` (needs on one filesystem add up)."""
    by_fs: dict[int, list[Need]] = {}
    for need in needs:
        if need.size > 0:
            dev = os.stat(existing(need.directory)).st_dev
            by_fs.setdefault(dev, []).append(need)
    for group in by_fs.values():
        total = sum(n.size for n in group)
        free = available(group[0].directory)
        if total > free:
            raise CapacityError(group[0].directory, total, free,
                                ' and '.join(n.what for n in group))


def create_ram_file(path: str, size: int, what: str) -> int:
    """A new private file of ``size`` bytes at ``path``, every block
    allocated (see the module docstring); its descriptor. CapacityError
    (and no file) if the filesystem cannot hold it."""
    fd = create_private(path, size)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        os.close(fd)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            directory = os.path.dirname(path) or '.'
            raise CapacityError(directory, size, available(directory),
                                what) from None
        raise
    return fd
