"""Files that other processes read while we write them.

:func:`write_json_atomic` replaces a file in one step, so a reader sees
either the old document or the new one, never half of one::

    write_json_atomic('/var/lib/mftvm/vm0/primary/status.json', data)
"""

from __future__ import annotations

import json
import os
from typing import Any


def write_json_atomic(path: str, data: Any, mode: int = 0o600) -> None:
    """Write ``data`` as JSON to ``path`` through a temporary file in the
    same directory (unique to this process and thread), then rename."""
    tmp = f'{path}.{os.getpid()}.{id(data):x}.tmp'
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                 mode)
    try:
        with os.fdopen(fd, 'w') as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
