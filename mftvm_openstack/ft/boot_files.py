"""A direct-kernel boot's kernel and initrd, shipped to the secondary.

A libvirt guest may boot from a kernel and an initrd of its host's own:
Nova's libvirt driver writes Glance's kernel and ramdisk images to
``<instances_path>/<uuid>/kernel`` and ``ramdisk`` and names them in
``<os>``. Those files exist on the primary's host only, and the
secondary's domain policy (:mod:`.domain_policy`) never starts a domain
that names a file it was not given. So the primary reads them
(:func:`read`, bounded by ``BOOT_FILE_MAX_BYTES``), announces each in the
HELLO (:func:`announce`: role, size, sha256) and sends its bytes in one
``BOOT_FILE`` frame right after it (:func:`send`); the secondary checks
each frame against the announcement before anything is written, keeps
the bytes as private files of its own instance directory, named only by
their role, and restores the domain with those paths in place of the
primary's (:func:`receive`)::

    paths = named_by(xml)       # {'kernel': '/var/lib/nova/.../kernel', ...}
    data = {role: read(path) for role, path in paths.items()}
    hello = Hello(..., boot_files=tuple(announce(r, d)
                                        for r, d in data.items()))
    # secondary, after the HELLO:
    kept = await receive(channel, hello.boot_files, '/var/lib/mftvm/vm0/'
                         'secondary/boot', wait_frame)
    # {'kernel': '/var/lib/mftvm/vm0/secondary/boot/kernel', ...}
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from mftvm_openstack import files
from mftvm_openstack.contract.hello import BOOT_FILE_ROLES, BootFile
from mftvm_openstack.contract.limits import BOOT_FILE_MAX_BYTES
from mftvm_openstack.contract.record import ContractError
from mftvm_openstack.ft import domain_policy
from mftvm_openstack.ft.transport import Kind

if TYPE_CHECKING:
    from mftvm_openstack.ft.pair.interfaces import Channel


class BootFileError(ContractError):
    """A boot file that cannot be shipped or was not received as
    announced; the message names it and says why."""


def named_by(xml: str) -> dict[str, str]:
    """``{role: path}`` of the boot files domain ``xml`` names in
    ``<os>`` (the primary's own libvirt XML)."""
    root = domain_policy.parse(xml)
    named = {}
    for role in BOOT_FILE_ROLES:
        path = (root.findtext(f'os/{role}') or '').strip()
        if path:
            named[role] = path
    return named


def check(path: str) -> int:
    """The size of ``path`` if it is a regular file small enough to
    ship; else BootFileError."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise BootFileError(f'{path}: {exc.strerror}') from None
    return _checked_size(path, st)


def _checked_size(path: str, st: os.stat_result) -> int:
    if not stat.S_ISREG(st.st_mode):
        raise BootFileError(f'{path} is not a regular file')
    if st.st_size > BOOT_FILE_MAX_BYTES:
        raise BootFileError(f'{path} has {st.st_size} bytes, more than '
                            f'the {BOOT_FILE_MAX_BYTES} a boot file may '
                            f'have')
    return st.st_size


def read(path: str) -> bytes:
    """The bytes of boot file ``path`` (see :func:`check`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise BootFileError(f'{path}: {exc.strerror}') from None
    with os.fdopen(fd, 'rb') as f:
        _checked_size(path, os.fstat(fd))
        # (one byte more than allowed: a file that grew is refused)
        data = f.read(BOOT_FILE_MAX_BYTES + 1)
    if len(data) > BOOT_FILE_MAX_BYTES:
        raise BootFileError(f'{path} grew beyond {BOOT_FILE_MAX_BYTES} '
                            f'bytes while it was read')
    return data


def announce(role: str, data: bytes) -> BootFile:
    """What the HELLO says of boot file ``role`` whose bytes are
    ``data``."""
    return BootFile(role=role, size=len(data),
                    sha256=hashlib.sha256(data).hexdigest())


async def send(channel: Channel, data: Sequence[bytes]) -> None:
    """One ``BOOT_FILE`` frame per file, in the HELLO's order."""
    for index, content in enumerate(data):
        await channel.send(Kind.BOOT_FILE, index, content)


async def receive(channel: Channel, announced: Sequence[BootFile],
                  directory: str | None,
                  wait_frame: Callable[[], Awaitable[None]]) \
        -> dict[str, str]:
    """The boot files ``announced`` in a HELLO, read off ``channel`` and
    kept in ``directory``: ``{role: path}``.

    Each frame must be the next ``BOOT_FILE`` of exactly the announced
    size (a longer one is refused unread) and hash; only then are its
    bytes written, as a private file named by its role alone (the
    primary's paths are never used here). ``wait_frame()`` bounds the
    wait for each frame. BootFileError (or the channel's ProtocolError)
    refuses the primary; the files already written stay until the next
    HELLO replaces them (nothing names them meanwhile).
    """
    if not announced:
        return {}
    if directory is None:
        raise BootFileError('this secondary takes no boot files')
    roles = [bf.role for bf in announced]
    if len(set(roles)) != len(roles):
        raise BootFileError(f'boot files announced twice: {roles}')
    kept = {}
    for index, boot_file in enumerate(announced):
        await wait_frame()
        msg = await channel.recv(limit=boot_file.size)
        if msg.kind != Kind.BOOT_FILE or msg.epoch != index:
            raise BootFileError(
                f'expected BOOT_FILE {index} ({boot_file.role}), got '
                f'{msg.kind.name} {msg.epoch}')
        if len(msg.payload) != boot_file.size:
            raise BootFileError(
                f'boot file {boot_file.role}: {len(msg.payload)} bytes, '
                f'{boot_file.size} announced')
        if hashlib.sha256(msg.payload).hexdigest() != boot_file.sha256:
            raise BootFileError(f'boot file {boot_file.role}: its sha256 '
                                f'is not the one announced')
        path = os.path.join(directory, boot_file.role)
        await asyncio.to_thread(_keep, directory, path, msg.payload)
        kept[boot_file.role] = path
    return kept


def _keep(directory: str, path: str, data: bytes) -> None:
    files.private_dir(directory)
    files.write_private(path, data)
