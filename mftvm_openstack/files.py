"""Files that other processes read while we write them, and files only
this host's processes (one user) may read at all.

:func:`write_json_atomic` replaces a file in one step, so a reader sees
either the old document or the new one, never half of one::

    write_json_atomic('/var/lib/mftvm/vm0/primary/status.json', data)

Guests' RAM, disks and device state are tenants' data: they live in
directories made by :func:`private_dir` (0700) and files made by
:func:`create_private` (0600, never through a planted symlink), whatever
the process umask::

    private_dir('/var/lib/mftvm/vm0/secondary')
    fd = create_private('/dev/shm/mftvm-vm0-secondary.ram')

A file a caller names (a guest's disk) must lie in a directory the
operator chose, and be reached from there without a symlink: one planted
in that directory (pointing at ``/dev/sda``, say) is refused, never
followed (:func:`file_in`)::

    file_in('/var/lib/mftvm/disks/web1.raw', ['/var/lib/mftvm/disks'])
    file_in('/etc/shadow', ['/var/lib/mftvm/disks'])
    # NotAllowed: /etc/shadow is not in an allowed directory (...)
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Sequence
from typing import Any

#: a directory of tenants' data: its owner only
PRIVATE_DIR_MODE = 0o700
#: a file of tenants' data (or of secrets): its owner only
PRIVATE_FILE_MODE = 0o600


def write_json_atomic(path: str, data: Any) -> None:
    """Replace ``path`` with ``data`` as JSON, in one step, as a 0600
    file (see :func:`write_private`)."""
    write_private(path, json.dumps(data, indent=1).encode())


def private_dir(path: str) -> str:
    """Make ``path`` (and missing parents) and leave it 0700; return it.

    ``os.makedirs``'s mode is filtered by the umask, so the mode is set
    again explicitly.
    """
    os.makedirs(path, PRIVATE_DIR_MODE, exist_ok=True)
    os.chmod(path, PRIVATE_DIR_MODE)
    return path


def create_private(path: str, size: int = 0) -> int:
    """A new, empty file at ``path``, 0600, ``size`` bytes (sparse); its
    descriptor, open for reading and writing.

    Whatever is at ``path`` already (a file a crash left, or a symlink
    someone planted in a shared directory such as /dev/shm) is unlinked,
    never opened: the file is created with ``O_EXCL|O_NOFOLLOW``, so if
    something appears again in between this fails instead of writing
    through it.
    """
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                 | os.O_CLOEXEC, PRIVATE_FILE_MODE)
    try:
        if size:
            os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_private(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` in one step, as a 0600 file: a
    reader sees the old content or the new, never half of it. The
    temporary file beside it is unique to this process and thread."""
    tmp = f'{path}.{os.getpid()}.{threading.get_ident():x}.tmp'
    fd = create_private(tmp)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


class NotAllowed(ValueError):
    """A path that is not a regular file in an allowed directory; the
    message is one line that names it and says why."""


def file_in(path: str, dirs: Sequence[str]) -> str:
    """``path`` if it names a regular file in one of ``dirs``, reached
    from that directory without a symbolic link; else :class:`NotAllowed`
    (FileNotFoundError if it is not there).

    The directories are the operator's, taken as they resolve; below
    them every component is opened with ``O_PATH|O_NOFOLLOW`` and looked
    at, so a link (to a block device, to a file of another tenant) is
    refused rather than followed, and so is a device or a FIFO.
    """
    if not os.path.isabs(path) or os.path.normpath(path) != path:
        raise NotAllowed(f'{path}: must be an absolute path without '
                         f'"..", "." or "//"')
    for top in dirs:
        top = os.path.normpath(top)
        if os.path.commonpath([path, top]) == top and path != top:
            return _walk(path, top)
    raise NotAllowed(f'{path} is not in an allowed directory '
                     f'({", ".join(dirs) or "none"})')


def _walk(path: str, top: str) -> str:
    parts = os.path.relpath(path, top).split(os.sep)
    fd = os.open(top, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for i, part in enumerate(parts):
            below = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                            dir_fd=fd)
            os.close(fd)
            fd = below
            mode = os.fstat(fd).st_mode
            here = os.path.join(top, *parts[:i + 1])
            if stat.S_ISLNK(mode):
                raise NotAllowed(f'{path}: {here} is a symbolic link (name '
                                 f'the file itself)')
            if i < len(parts) - 1 and not stat.S_ISDIR(mode):
                raise NotAllowed(f'{path}: {here} is not a directory')
        if not stat.S_ISREG(mode):
            raise NotAllowed(f'{path} is not a regular file')
        return path
    finally:
        os.close(fd)
