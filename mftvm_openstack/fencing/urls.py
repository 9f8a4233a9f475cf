"""Backend URLs: options added where unset, passwords kept out of logs.

    >>> with_defaults('redis://h:6379?timeout=5', timeout=1, lock_timeout=3)
    'redis://h:6379?timeout=5&lock_timeout=3'
    >>> mask_url('redis://:secret@h:6379')
    'redis://:***@h:6379'
"""

from __future__ import annotations

import urllib.parse
from typing import Any


def with_defaults(url: str, **defaults: Any) -> str:
    """``url`` with query options added where it does not set them."""
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    for key, value in defaults.items():
        query.setdefault(key, str(value))
    return parts._replace(
        query=urllib.parse.urlencode(query, safe=',:')).geturl()


def mask_url(url: str) -> str:
    """``url`` with its password replaced, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f':{parts.password}@', ':***@', 1)
    return parts._replace(netloc=netloc).geturl()
