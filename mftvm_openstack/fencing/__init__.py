"""Fencing: at most one running copy of a guest, ever.

A :class:`Fence` is the guest's ownership. Whoever runs the guest holds it;
a secondary resumes the guest only once it has won it. Beside ownership, a
fence keeps one more fact per pair: whether the secondary's replica may
still take over. A primary that drops its secondary and runs on alone marks
that replica stale *before* any of its held output leaves, and a secondary
checks the mark only once it owns the guest — so what it reads is the last
word of the previous owner::

    fence = load_fence('redis://10.0.0.5:6379', 'vm0', member='hv1',
                       lease=3, state_dir='/var/lib/mftvm/vm0')
    if fence.acquire(timeout=10):          # blocks until won, or gives up
        fence.renew()                      # every lease/4 while running
        fence.mark_stale('pair-1', 'the secondary was lost')
        fence.replica_valid('pair-1')      # (False, 'the secondary ...')

Two implementations:

* :class:`ToozFence` — a tooz lock on a coordination backend (Redis,
  etcd, ...). The lock is a lease: it lapses ``lease`` seconds after the
  last renewal. A holder that cannot renew must stop its guest itself
  before then (``deadline()`` says when); stale marks are tooz groups,
  which outlive their creator.
* :class:`FileFence` — a lock file and a JSON record, for pairs whose two
  sides share one machine (``mftvm protect``, the demo). Its lease never
  lapses: the kernel drops the lock when the holder dies.

The calls block (tooz is synchronous): asyncio callers run them in a
thread.
"""

from __future__ import annotations

import abc
import fcntl
import json
import math
import os
import socket
import time
import urllib.parse
from typing import Any, Optional

STALE_PREFIX = 'mftvm-stale'


class FenceError(Exception):
    """The coordination backend could not answer; ownership is unknown."""


class Fence(abc.ABC):
    """The ownership of one guest."""

    #: seconds the ownership lasts without renewal (inf: until death)
    lease: float = math.inf

    def __init__(self) -> None:
        self._renewed_at: Optional[float] = None

    @abc.abstractmethod
    def acquire(self, timeout: float) -> bool:
        """Win the ownership within ``timeout`` seconds, or return False."""

    @abc.abstractmethod
    def _renew(self) -> bool:
        """Extend the lease; False if it is no longer ours."""

    @abc.abstractmethod
    def release(self) -> None:
        """Give the ownership up (the guest no longer runs here)."""

    @abc.abstractmethod
    def reclaim(self) -> Optional[bool]:
        """After the lease lapsed unrenewed: take it again if it is free.

        True: ours again; False: another holder has it (stop the guest
        now); None: the backend did not answer.
        """

    @abc.abstractmethod
    def mark_stale(self, pair_id: str, reason: str) -> None:
        """Record durably that ``pair_id``'s replica may not take over."""

    @abc.abstractmethod
    def replica_valid(self, pair_id: str) -> tuple[bool, str]:
        """Whether ``pair_id``'s replica may take over, and if not, why."""

    def renew(self) -> None:
        """Extend the lease; FenceError if that failed or it is lost.

        The lease is counted from the moment the renewal was *sent*, so
        :meth:`deadline` is never later than the backend's own expiry.
        """
        sent = time.monotonic()
        if not self._renew():
            raise FenceError('the ownership was lost to another host')
        self._renewed_at = sent

    def deadline(self, margin: float) -> float:
        """The monotonic time by which the owner must have stopped its
        guest if no renewal succeeds meanwhile (inf for a file lock)."""
        if math.isinf(self.lease) or self._renewed_at is None:
            return math.inf
        return self._renewed_at + self.lease - margin

    def close(self) -> None:
        """Release the connection to the backend (not the ownership)."""


class FileFence(Fence):
    """A lock file: one holder per machine; replica marks in a JSON file."""

    def __init__(self, state_dir: str) -> None:
        super().__init__()
        self.path = os.path.join(state_dir, 'owner.lock')
        self.record_path = os.path.join(state_dir, 'replica.json')
        self._fd: Optional[int] = None

    def _try(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def acquire(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._try():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _renew(self) -> bool:
        return self._fd is not None

    def reclaim(self) -> Optional[bool]:
        return self._fd is not None or self._try()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _records(self) -> dict[str, Any]:
        try:
            with open(self.record_path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def mark_stale(self, pair_id: str, reason: str) -> None:
        if self._fd is None:
            raise FenceError('only the owner may mark a replica stale')
        records = self._records()
        records[pair_id] = reason
        tmp = f'{self.record_path}.{os.getpid()}.tmp'
        with open(tmp, 'w') as f:
            json.dump(records, f)
            f.flush()
            # Durable before any output that depends on it leaves.
            os.fsync(f.fileno())
        os.replace(tmp, self.record_path)

    def replica_valid(self, pair_id: str) -> tuple[bool, str]:
        reason = self._records().get(pair_id)
        return (reason is None, reason or '')


def _with_defaults(url: str, **defaults: Any) -> str:
    """``url`` with query options added where it does not set them."""
    parts = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(parts.query))
    for key, value in defaults.items():
        query.setdefault(key, str(value))
    return parts._replace(query=urllib.parse.urlencode(query)).geturl()


def mask_url(url: str) -> str:
    """``url`` with its password replaced, for messages and logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f':{parts.password}@', ':***@', 1)
    return parts._replace(netloc=netloc).geturl()


class ToozFence(Fence):
    """A tooz lock as a lease; stale replicas as tooz groups."""

    def __init__(self, url: str, name: str, member: str,
                 lease: int = 3) -> None:
        super().__init__()
        from tooz import coordination  # only deployments with a backend

        self.lease = float(lease)
        self.name = name
        self._url = mask_url(url)
        # The lease is the lock's expiry; a backend that does not answer
        # within a second counts as unreachable.
        full = _with_defaults(url, lock_timeout=lease, timeout=1,
                              socket_timeout=1)
        self._coordinator = coordination.get_coordinator(
            full, member.encode())
        self._started = False
        self._lock: Any = None
        self._held = False

    def _start(self) -> None:
        """Connect on first use, so an absent backend is retried."""
        if not self._started:
            try:
                self._probe()
                self._coordinator.start(start_heart=False)
            except Exception as exc:
                raise FenceError(f'cannot reach the coordination backend '
                                 f'{self._url}: {exc}') from None
            self._started = True
            client = getattr(self._coordinator, '_client', None)
            if hasattr(client, 'set_retry'):
                # redis-py retries a dead connection for many seconds by
                # default; a lease of a few seconds needs a quick answer.
                from redis.backoff import NoBackoff
                from redis.retry import Retry
                client.set_retry(Retry(NoBackoff(), 1))
            self._lock = self._coordinator.get_lock(
                f'mftvm-owner-{self.name}'.encode())

    def _probe(self) -> None:
        """Fail fast on a backend host that does not answer at all."""
        parts = urllib.parse.urlsplit(self._url)
        if parts.scheme == 'redis' and parts.hostname:
            with socket.create_connection(
                    (parts.hostname, parts.port or 6379), timeout=1):
                pass

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except FenceError:
            raise
        except Exception as exc:
            raise FenceError(f'{what} on {self._url}: {exc}') from None

    def acquire(self, timeout: float) -> bool:
        sent = time.monotonic()
        deadline = sent + timeout
        while True:
            sent = time.monotonic()
            try:
                self._start()
                won = self._lock.acquire(blocking=False)
            except Exception:
                won = False     # the backend is away: try until timeout
            if won:
                self._held = True
                self._renewed_at = sent
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)

    def _renew(self) -> bool:
        if not self._held:
            return False
        beat = getattr(self._lock, 'heartbeat', None)
        if beat is None:
            return True     # a lock that never lapses (tooz's file driver)
        return bool(self._call('renewing the lease', beat))

    def reclaim(self) -> Optional[bool]:
        sent = time.monotonic()
        try:
            self._start()
            if self._held:
                # A renewal whose answer was lost may have landed after
                # all: then the lease is still ours.
                try:
                    if self._renew():
                        self._renewed_at = sent
                        return True
                except FenceError:
                    pass
            won = bool(self._lock.acquire(blocking=False))
        except Exception:
            return None
        if won:
            self._held = True
            self._renewed_at = sent
        return won

    def release(self) -> None:
        if self._held:
            self._held = False
            try:
                self._lock.release()
            except Exception:
                pass    # it lapses on its own

    def _stale_group(self, pair_id: str) -> bytes:
        return f'{STALE_PREFIX}-{self.name}-{pair_id}'.encode()

    def mark_stale(self, pair_id: str, reason: str) -> None:
        from tooz import coordination

        if not self._held:
            raise FenceError('only the owner may mark a replica stale')
        self._start()
        try:
            self._coordinator.create_group(self._stale_group(pair_id)).get()
        except coordination.GroupAlreadyExist:
            pass
        except Exception as exc:
            raise FenceError(f'marking the replica stale on {self._url}: '
                             f'{exc}') from None

    def replica_valid(self, pair_id: str) -> tuple[bool, str]:
        self._start()
        groups = self._call('reading the replica marks',
                            lambda: self._coordinator.get_groups().get())
        if self._stale_group(pair_id) in groups:
            return False, 'its primary ran on after dropping it'
        return True, ''

    def close(self) -> None:
        if not self._started:
            return
        try:
            self._coordinator.stop()
        except Exception:
            pass


def load_fence(url: Optional[str], name: str, *, member: str, lease: int,
               state_dir: str) -> Fence:
    """A ToozFence for a backend URL, a FileFence without one."""
    if not url or url.startswith('file-lock:'):
        return FileFence(state_dir)
    return ToozFence(url, name, member, lease)
