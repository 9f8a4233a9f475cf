"""A child's log file kept under a size limit while the child writes it.

QEMU (and qemu-storage-daemon) write their stdout and stderr straight into
a log file the host process opened for them (``vm.ChildProcess``). Some
messages repeat for as long as a guest runs: QEMU 7.2 warns once per
``blockdev-backup`` job that an NBD target gives no cluster size, and the
block-copy baseline starts one such job in every checkpoint. So the log
has a limit, and its owner cuts it back when it grew past it::

    cut_back('/var/lib/mftvm/vm0/primary/qemu.log', limit=1 << 20)

The cut keeps the log's head (how the process started) and its newest
lines (what it said last, which ``ChildProcess.last_log_line`` reads when
the child dies), with one line between them that says how much was cut.
The child keeps appending (its descriptor is ``O_APPEND``); a line it
writes during the cut itself may be lost, never a line outside it.
"""

from __future__ import annotations

import os

#: the log of one QEMU or qsd: its limit, and the head kept by a cut
LIMIT = 1 << 20
HEAD = 16 << 10


def cut_back(path: str, limit: int = LIMIT, head: int = HEAD) -> int:
    """If ``path`` is larger than ``limit`` bytes, keep its first ``head``
    bytes (at most ``limit // 4``) and its last ``limit // 2`` (whole
    lines of both), with a line between that says what was cut; return
    the bytes cut (0: none)."""
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return 0
    if size <= limit:
        return 0
    head, tail_size = min(head, limit // 4), limit // 2
    with open(path, 'rb') as f:
        first = f.read(head)
        first = first[:first.rfind(b'\n') + 1]
        start = max(size - tail_size, len(first))
        f.seek(start)
        tail = f.read()      # (to its end now: the child may have written)
    end = start + len(tail)
    tail = tail[tail.find(b'\n') + 1:]
    cut = end - len(first) - len(tail)
    os.truncate(path, len(first))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b'[mftvm: %d bytes of this log were cut to keep it '
                     b'under %d]\n' % (cut, limit) + tail)
    finally:
        os.close(fd)
    return cut
