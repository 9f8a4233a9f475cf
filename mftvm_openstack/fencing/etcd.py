"""A fence on an etcd cluster: the owner's lease is a consensus decision.

The owner key ``/mftvm/owner/<guest>`` holds the owner's token and is
bound to an etcd lease of ``lease`` seconds; the cluster deletes it when
the lease runs out unrenewed, whichever member leads by then. Marking a
replica stale is a transaction that writes only while the owner key
still holds our token, so a holder that lost its lease cannot write a
mark (nor believe it did). Marks have no lease: they outlive their
writer::

    fence = EtcdFence('etcd3+http://10.0.0.5:2379'
                      '?endpoints=10.0.0.6:2379,10.0.0.7:2379',
                      'vm0', member='hv1', lease=3)
    if fence.acquire(timeout=10):
        fence.renew()                      # every lease/4 while running

The client is etcd3gw (what tooz's etcd driver uses), over etcd's JSON
gateway. Every call has one budget (``timeout``, 1 s by default): a
member that refuses or does not answer costs the rest of it and the next
call starts at the next member, so a cluster that has lost quorum (or
that this host cannot reach) is a FenceError within about a second,
never a hang. Options in the URL: ``endpoints`` (the other members),
``timeout``, ``ca_cert``, ``cert_key``, ``cert_cert`` (https).
"""

from __future__ import annotations

import base64
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable
from typing import Any, Optional, TypeVar

from mftvm_openstack.fencing.base import Fence, FenceError, FenceLost
from mftvm_openstack.fencing.urls import mask_url

T = TypeVar('T')

OWNER_PREFIX = '/mftvm/owner/'
STALE_PREFIX = '/mftvm/stale/'
#: longest stale reason kept (a mark is a flag, not a log)
MAX_REASON = 200


def _b64(data: str) -> str:
    return base64.b64encode(data.encode()).decode('ascii')


def _parse_endpoint(text: str, default_port: int) -> tuple[str, int]:
    parts = urllib.parse.urlsplit(f'//{text.strip()}')
    if not parts.hostname or parts.path or parts.query:
        raise ValueError(f'bad etcd endpoint {text!r}')
    return parts.hostname, parts.port or default_port


def parse_url(url: str) -> tuple[str, list[tuple[str, int]], dict[str, str]]:
    """``etcd3+http(s)://HOST[:PORT][?endpoints=H:P,...&timeout=S]`` as
    (protocol, endpoints, other options); ValueError if malformed."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ('etcd3+http', 'etcd3+https'):
        raise ValueError(f'not an etcd3+http(s) URL: {mask_url(url)}')
    options = dict(urllib.parse.parse_qsl(parts.query))
    endpoints = [_parse_endpoint(parts.netloc or 'localhost', 2379)]
    for extra in filter(None, options.pop('endpoints', '').split(',')):
        endpoints.append(_parse_endpoint(extra, 2379))
    return parts.scheme.split('+', 1)[1], endpoints, options


class EtcdFence(Fence):
    """An etcd key bound to a lease, on a cluster of one or more members."""

    def __init__(self, url: str, name: str, member: str,
                 lease: int = 3) -> None:
        super().__init__()
        import etcd3gw  # only deployments with an etcd backend

        protocol, self._endpoints, options = parse_url(url)
        self._url = mask_url(url)
        if lease < 1:
            raise ValueError(f'an etcd lease is whole seconds, not {lease}')
        self.lease = float(lease)
        self.name = name
        self._budget = float(options.get('timeout', 1))
        if not 0 < self._budget <= 30:
            raise ValueError(f'etcd timeout {self._budget} out of (0, 30]')
        self._current = 0
        host, port = self._endpoints[0]
        self._client = etcd3gw.client(
            host=host, port=port, protocol=protocol,
            ca_cert=options.get('ca_cert'),
            cert_key=options.get('cert_key'),
            cert_cert=options.get('cert_cert'),
            api_path='/v3/', timeout=self._budget)
        self._owner_key = f'{OWNER_PREFIX}{name}'
        self._token = f'{member}/{secrets.token_hex(8)}'
        #: the lease bound to our owner key, while we hold it
        self._lease_id: Optional[int] = None
        #: the lease of a create whose answer we may have missed
        self._granted: Optional[int] = None
        self._op_start = 0.0
        # One operation at a time: the renewing thread and the guest's
        # own calls share one client (its member and its timeout).
        self._busy = threading.RLock()

    # -- one call, with failover across members --------------------------

    def _use(self, index: int) -> None:
        self._current = index % len(self._endpoints)
        self._client.host, self._client.port = \
            self._endpoints[self._current]

    def _begin(self) -> None:
        """Start the budget of one fence operation (all its calls)."""
        self._op_start = time.monotonic()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()`` against the members in turn, within the operation's
        budget."""
        last: Exception = FenceError('no time left to ask')
        for _ in self._endpoints:
            left = self._budget - (time.monotonic() - self._op_start)
            if left <= 0.05:
                break
            self._client.timeout = left
            try:
                return fn()
            except Exception as exc:    # refused, timed out, no leader...
                last = exc
                # This member failed us: the next call starts elsewhere.
                self._use(self._current + 1)
        raise FenceError(f'{what} on {self._url}: {last}') from None

    def _txn(self, compare: list[dict[str, Any]],
             success: list[dict[str, Any]]) -> bool:
        txn = {'compare': compare, 'success': success, 'failure': []}
        return self._call('a transaction',
                          lambda: self._client.transaction(txn)
                          ).get('succeeded') is True

    def _holds_token(self) -> dict[str, Any]:
        return {'key': _b64(self._owner_key), 'result': 'EQUAL',
                'target': 'VALUE', 'value': _b64(self._token)}

    # -- the fence --------------------------------------------------------

    def _try_acquire(self) -> bool:
        owner = self._owner()
        if owner == self._token and self._granted is not None:
            # Our create landed though its answer was lost: renew before
            # counting on it (the lease was granted before this attempt).
            self._lease_id = self._granted
            return self._renew()
        if owner is not None:
            return False        # held (a lapsed lease takes its key along)
        lease = self._call('granting a lease',
                           lambda: self._client.lease(int(self.lease)))
        self._granted = lease.id
        created = self._txn(
            [{'key': _b64(self._owner_key), 'result': 'EQUAL',
              'target': 'CREATE', 'create_revision': 0}],
            [{'request_put': {'key': _b64(self._owner_key),
                              'value': _b64(self._token),
                              'lease': lease.id}}])
        if created:
            self._lease_id = lease.id
        return created

    def _try_once(self) -> bool:
        with self._busy:
            self._begin()
            return self._try_acquire()

    def _renew(self) -> bool:
        from etcd3gw.lease import Lease

        with self._busy:
            lease_id = self._lease_id
            if lease_id is None:
                return False
            self._begin()
            ttl = self._call('renewing the lease',
                             Lease(lease_id, self._client).refresh)
            # A lapsed lease answers with no TTL; the key went with it.
            # A live one still proves nothing if the key was deleted.
            if ttl <= 0 or self._owner() != self._token:
                self._lease_id = None
                return False
            return True

    def _owner(self) -> Optional[str]:
        values = self._call('reading the owner',
                            lambda: self._client.get(self._owner_key))
        return values[0].decode(errors='replace') if values else None

    def reclaim(self) -> Optional[bool]:
        sent = time.monotonic()
        with self._busy:
            try:
                # A renewal whose answer was lost may have landed after
                # all: then the lease is still ours.
                if self._lease_id is not None and self._renew():
                    won = True
                else:
                    self._begin()
                    won = self._try_acquire()
            except FenceError:
                return None
        if won:
            self._renewed_at = sent
        return won

    def release(self) -> None:
        from etcd3gw.lease import Lease

        with self._busy:
            lease_id, self._lease_id = self._lease_id, None
            self._granted = None
            if lease_id is None:
                return
            self._begin()
            try:
                # Revoking deletes our key (only ours: it is bound to it).
                self._call('releasing', Lease(lease_id, self._client).revoke)
            except FenceError:
                pass    # it lapses on its own

    def _stale_key(self, pair_id: str) -> str:
        return f'{STALE_PREFIX}{self.name}/{pair_id}'

    def mark_stale(self, pair_id: str, reason: str) -> None:
        with self._busy:
            if self._lease_id is None:
                raise FenceLost('only the owner may mark a replica stale')
            self._begin()
            # Written only while the owner key is ours at that moment.
            written = self._txn(
                [self._holds_token()],
                [{'request_put': {'key': _b64(self._stale_key(pair_id)),
                                  'value': _b64(reason[:MAX_REASON]
                                                or 'stale')}}])
            if not written:
                self._lease_id = None
                raise FenceLost('the ownership was lost: the replica was '
                                'not marked stale')

    def replica_valid(self, pair_id: str) -> tuple[bool, str]:
        with self._busy:
            self._begin()
            values = self._call(
                'reading the replica marks',
                lambda: self._client.get(self._stale_key(pair_id)))
        if values:
            reason = values[0].decode(errors='replace')[:MAX_REASON]
            return False, reason or 'its primary ran on after dropping it'
        return True, ''

    def close(self) -> None:
        with self._busy:
            self._client.session.close()
