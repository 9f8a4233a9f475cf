"""A fence on a tooz coordination backend: Redis, for one site's tests.

The lock is a tooz lock whose expiry is the lease; stale marks are tooz
groups, which outlive their creator. A lock on one Redis is one server's
word, not a consensus decision: use it for a single node or a test lab,
and etcd (:mod:`mftvm_openstack.fencing.etcd`) in production::

    fence = ToozFence('redis://10.0.0.5:6379', 'vm0', member='hv1', lease=3)
    if fence.acquire(timeout=10):
        fence.renew()                      # every lease/4 while running
"""

from __future__ import annotations

import socket
import time
import urllib.parse
from typing import Any, Optional

from mftvm_openstack.fencing.base import (
    STALE_PREFIX,
    Fence,
    FenceError,
    FenceLost,
)
from mftvm_openstack.fencing.urls import mask_url, with_defaults

#: longest stale reason kept (a mark is a flag, not a log)
MAX_REASON = 200

#: KEYS: the lock, the mark; ARGV: our token, the reason
MARK_IF_OWNER = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    redis.call('set', KEYS[2], ARGV[2])
    return 1
end
return 0
"""


class ToozFence(Fence):
    """A tooz lock as a lease; stale replicas as tooz groups."""

    def __init__(self, url: str, name: str, member: str,
                 lease: int = 3) -> None:
        super().__init__()
        from tooz import coordination  # only deployments with a backend

        if urllib.parse.urlsplit(url).scheme.startswith('etcd3'):
            # tooz's etcd lock renews a lapsed lease as if it held: a fence
            # must know, so etcd has its own (load_fence picks it).
            raise ValueError('an etcd3+http(s) URL needs EtcdFence')
        self.lease = float(lease)
        self.name = name
        self._url = mask_url(url)
        # The lease is the lock's expiry; a backend that does not answer
        # within a second counts as unreachable.
        full = with_defaults(url, lock_timeout=lease, timeout=1,
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
            client: Any = getattr(self._coordinator, '_client', None)
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

    def _try_once(self) -> bool:
        self._start()
        won = bool(self._call('acquiring the lock',
                              self._lock.acquire, blocking=False))
        if won:
            self._held = True
        return won

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

    def _redis(self) -> Any:
        """The Redis client and our lock's (key, token), if on Redis."""
        client = getattr(self._coordinator, '_client', None)
        inner = getattr(self._lock, '_lock', None)
        if client is None or not hasattr(client, 'register_script') or \
                inner is None:
            return None
        return client, self._lock.name, inner.local.token

    def _stale_key(self, pair_id: str) -> bytes:
        namespace: bytes = getattr(self._coordinator, 'namespace', b'')
        return namespace + b'_' + self._stale_group(pair_id)

    def mark_stale(self, pair_id: str, reason: str) -> None:
        if not self._held:
            raise FenceLost('only the owner may mark a replica stale')
        self._start()
        redis = self._redis()
        if redis is None:
            self._mark_group(pair_id)
            return
        client, lock_key, token = redis
        # One script, so Redis itself compares: written only while the
        # lock holds our token at that moment.
        written = self._call('marking the replica stale', client.eval,
                             MARK_IF_OWNER, 2, lock_key,
                             self._stale_key(pair_id), token or b'',
                             reason[:MAX_REASON] or 'stale')
        if not written:
            self._held = False
            raise FenceLost('the ownership was lost: the replica was not '
                            'marked stale')

    def _mark_group(self, pair_id: str) -> None:
        """Other tooz backends (tests only): a group, written without a
        compare on the lock."""
        from tooz import coordination

        try:
            self._coordinator.create_group(self._stale_group(pair_id)).get()
        except coordination.GroupAlreadyExist:
            pass
        except Exception as exc:
            raise FenceError(f'marking the replica stale on {self._url}: '
                             f'{exc}') from None

    def replica_valid(self, pair_id: str) -> tuple[bool, str]:
        self._start()
        redis = self._redis()
        if redis is not None:
            reason = self._call('reading the replica mark', redis[0].get,
                                self._stale_key(pair_id))
            if reason is not None:
                return False, (reason.decode(errors='replace')
                               or 'its primary ran on after dropping it')
            return True, ''
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
