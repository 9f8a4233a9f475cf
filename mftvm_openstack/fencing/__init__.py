"""Fencing: at most one running copy of a guest, ever.

A :class:`Fence` is the guest's ownership. Whoever runs the guest holds it;
a secondary resumes the guest only once it has won it. Beside ownership, a
fence keeps one more fact per pair: whether the secondary's replica may
still take over. A primary that drops its secondary and runs on alone marks
that replica stale *before* any of its held output leaves, and a secondary
checks the mark only once it owns the guest — so what it reads is the last
word of the previous owner::

    fence = load_fence('etcd3+http://10.0.0.5:2379'
                       '?endpoints=10.0.0.6:2379,10.0.0.7:2379', 'vm0',
                       member='hv1', lease=3, state_dir='/var/lib/mftvm/vm0')
    if fence.acquire(timeout=10):          # blocks until won, or gives up
        fence.renew()                      # every lease/4 while running
        fence.mark_stale('pair-1', 'the secondary was lost')
        fence.replica_valid('pair-1')      # (False, 'the secondary ...')

The backends, picked by :func:`load_fence` from the URL:

* :class:`EtcdFence` (``etcd3+http(s)://``, module ``etcd``) — production:
  a key bound to a lease on an etcd cluster, decided by its quorum.
* :class:`ToozFence` (``redis://`` and other tooz URLs, module
  ``coordinated``) — a tooz lock on one server: single node and tests.
* :class:`FileFence` (no URL, module ``filelock``) — a lock file, for
  pairs whose two sides share one machine (``mftvm protect``, the demo).

The calls block: asyncio callers run them in a thread.
"""

from __future__ import annotations

from typing import Optional

from mftvm_openstack.fencing.base import (
    STALE_PREFIX,
    Fence,
    FenceError,
    FenceLost,
)
from mftvm_openstack.fencing.coordinated import ToozFence
from mftvm_openstack.fencing.etcd import EtcdFence
from mftvm_openstack.fencing.filelock import FileFence
from mftvm_openstack.fencing.urls import mask_url

__all__ = ['STALE_PREFIX', 'EtcdFence', 'Fence', 'FenceError', 'FenceLost',
           'FileFence', 'ToozFence', 'check_store', 'dies_with_holder',
           'load_fence', 'mask_url']

#: the guest name :func:`check_store` reads under (no guest has it: guest
#: names are instance UUIDs or [A-Za-z0-9_.-] names without a space)
CHECK_NAME = 'mftvm agent check'


def dies_with_holder(url: Optional[str]) -> bool:
    """Whether the fence for ``url`` is a lock that ends only when its
    holder dies (a lock file), rather than a lease that lapses."""
    return not url or url.startswith('file-lock:')


def load_fence(url: Optional[str], name: str, *, member: str, lease: int,
               state_dir: str) -> Fence:
    """An EtcdFence or ToozFence for a backend URL, a FileFence without
    one."""
    if not url or dies_with_holder(url):
        return FileFence(state_dir)
    if url.startswith('etcd3+'):
        return EtcdFence(url, name, member, lease)
    return ToozFence(url, name, member, lease)


def check_store(url: str, member: str) -> None:
    """Ask the fencing store at ``url`` one read, as a fence does (a
    replica mark no guest has); FenceError if it does not answer within
    the backend's budget (about a second for etcd)::

        check_store('etcd3+http://10.0.0.5:2379', member='hv1')
    """
    fence = load_fence(url, CHECK_NAME, member=member, lease=1,
                       state_dir='')
    try:
        fence.replica_valid(CHECK_NAME)
    except FenceError:
        raise
    except Exception as exc:    # a client library's own error
        raise FenceError(f'{mask_url(url)}: {exc}') from None
    finally:
        fence.close()
