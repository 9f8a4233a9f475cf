"""Keep an FT server's ``ft_status`` true, and its secondary's hold.

Nova's driver records where protection stands in the instance's
*system metadata* (``ft_status``), which only Nova writes, and mirrors
it into the server's metadata, where a tenant sees it (``openstack
server show -c properties``) and can change it. Nova 34 tells a compute
nothing of a metadata change (the API writes the database; the
``change_instance_metadata`` RPC is gone), so a :class:`StatusKeeper`
looks instead, on every tick of the driver's watcher (the thread that
asks the local agent ``list()`` for takeovers every ``[ft]
handoff_interval`` seconds, 2 s by default)::

    keeper = StatusKeeper(driver, 'hv1')
    listed_at = time.monotonic()
    entries = agent_api.list(context, 'hv1')
    keeper.noted(uuid)                # the driver changed it since
    keeper.tick(context, entries, listed_at)  # entries None: the agent
                                              # did not answer

Each tick loads the servers the agent lists as primaries here (one
``InstanceList.get_by_filters`` on their uuids: the FT servers that run
here); every :data:`SWEEP_INTERVAL` seconds (30), and at the first
tick, all of the host's (``InstanceList.get_by_host``), so that the
mirror of one the agent does not list (stopped, never protected) is
kept too. For each FT server among them (a server Nova is working on,
with a ``task_state`` or its lock held, is left for the next tick):

* **the mirror**: a server's metadata ``ft_status`` that differs from
  the system metadata's is written back;
* **the truth**: the primary's live status from the agent is judged
  against Nova's record (:func:`~mftvm_openstack.nova.live_status.judge`).
  A secondary lost (the primary runs unprotected, not by request) is
  recorded at once (``unprotected: secondary hv2 lost (<why>)``) and its
  Placement allocation (the ``uuid5`` secondary consumer's) deleted; a
  protection that came through is recorded ``protected``;
* **re-protection**: a server that runs unprotected, not by request, is
  protected again as at spawn (a new secondary chosen through Placement,
  at the first attempt not the host just lost, claimed under the same
  consumer), in a thread
  of its own under the instance's lock, since the agent answers once the
  first epoch is committed. Attempts are ``[ft]
  reprotect_retry_interval`` seconds apart (30 s); in between,
  ``ft_status`` says why the last one failed (``unprotected: no
  secondary host (<why>)``, ``error: protect failed: <why>``). A server
  handed off here re-protects this way only with ``[ft]
  reprotect_after_handoff``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import nova.objects.instance as instance_obj
from nova.compute import vm_states
from oslo_concurrency import lockutils
from oslo_log import log as logging

from mftvm_openstack import conf as mftvm_conf
from mftvm_openstack.contract.states import Role
from mftvm_openstack.contract.status import InstanceStatus
from mftvm_openstack.nova import ft_request, handoff, live_status
from mftvm_openstack.nova.handoff import FAILED_OVER, SECONDARY_HOST, STATUS

LOG = logging.getLogger(__name__)

#: the instance's lock, as the compute manager takes it
#: (``nova.utils.synchronized(instance.uuid)``)
LOCK_PREFIX = 'nova-'
#: seconds between two looks at all of a host's servers
SWEEP_INTERVAL = 30.0
#: what a look loads of each server
_ATTRS = ['metadata', 'system_metadata']


def primaries(entries: Iterable[Mapping[str, Any]]
              ) -> dict[str, InstanceStatus]:
    """The primaries an agent's ``list()`` shows, by instance::

        >>> sorted(primaries([
        ...     {'instance': 'a', 'role': 'primary', 'state': 'protected'},
        ...     {'instance': 'b', 'role': 'secondary', 'state': 'standby'},
        ...     {'role': 'nonsense'}]))
        ['a']
    """
    out = {}
    # (the hand-off's look logs what it cannot read)
    for status in handoff.listed(entries):
        if status.role is Role.PRIMARY and status.instance:
            out[status.instance] = status
    return out


class StatusKeeper:
    """See the module docstring.

    ``driver`` is the :class:`FTDriverMixin
    <mftvm_openstack.nova.driver.FTDriverMixin>` whose ``_set_status``,
    ``_release_secondary``, ``_protect``, ``_ft_asked`` and
    ``reprotect_after_handoff`` it uses, so that what it records reads
    as the driver's own.
    """

    def __init__(self, driver: Any, host: str) -> None:
        self.driver = driver
        self.host = host
        self._lock = threading.Lock()
        #: instances being re-protected now (one thread each)
        self._busy: set[str] = set()
        #: instance -> monotonic time before which no new attempt starts
        self._next_try: dict[str, float] = {}
        #: monotonic time of the next look at all of the host's servers
        self._next_sweep = 0.0
        #: instance -> monotonic time its record last changed outside a
        #: look (a re-protection, a hand-off): a list taken before then
        #: is not judged against it
        self._changed_at: dict[str, float] = {}

    #: seconds between two looks at all of this host's servers (the
    #: others look only at those the agent lists as primaries here)
    sweep_interval = SWEEP_INTERVAL

    @property
    def retry_interval(self) -> float:
        return float(mftvm_conf.CONF.ft.reprotect_retry_interval)


    def noted(self, uuid_: str) -> None:
        """The driver changed ``uuid_``'s record (a hand-off) after the
        list it will pass to :meth:`tick`."""
        with self._lock:
            self._changed_at[uuid_] = time.monotonic()

    def tick(self, context: Any,
             entries: Optional[Iterable[Mapping[str, Any]]],
             listed_at: float) -> None:
        """One look at ``entries``, the agent's ``list()`` asked at
        ``listed_at`` (``time.monotonic()``); None: the agent did not
        answer (the mirror is kept, nothing is judged)."""
        live = primaries(entries) if entries is not None else None
        now = time.monotonic()
        sweep = now >= self._next_sweep
        try:
            if sweep:
                instances = instance_obj.InstanceList.get_by_host(
                    context, self.host, expected_attrs=_ATTRS)
                self._next_sweep = now + self.sweep_interval
            elif live:
                instances = instance_obj.InstanceList.get_by_filters(
                    context, {'uuid': sorted(live), 'host': self.host,
                              'deleted': False}, expected_attrs=_ATTRS)
            else:
                return
        except Exception as exc:
            LOG.warning('Cannot read the instances of %s to keep their '
                        'ft_status: %s', self.host, exc)
            return
        seen = set()
        for instance in instances:
            if STATUS not in instance.system_metadata or \
                    instance.task_state is not None:
                continue
            seen.add(instance.uuid)
            with self._lock:
                stale = self._changed_at.get(instance.uuid, -1.0) >= \
                    listed_at
            try:
                with lockutils.lock(instance.uuid, LOCK_PREFIX,
                                    blocking=False, do_log=False):
                    self._keep(context, instance,
                               None if stale else live)
            except lockutils.AcquireLockFailedException:
                continue        # Nova is at it: next tick
            except Exception:
                LOG.exception('Keeping ft_status failed', instance=instance)
        if not sweep:
            return
        with self._lock:
            for uuid_ in set(self._next_try) - seen:
                del self._next_try[uuid_]
            for uuid_ in set(self._changed_at) - seen:
                if self._changed_at[uuid_] < listed_at:
                    del self._changed_at[uuid_]

    # -- under the instance's lock --

    def _keep(self, context: Any, instance: Any,
              live: Optional[dict[str, InstanceStatus]]) -> None:
        verdict = self._judge(instance, live)
        if verdict.status or verdict.release or self._mirror_off(instance):
            # what was read before the lock may be stale: read again
            instance.refresh()
            if instance.task_state is not None:
                return
            verdict = self._judge(instance, live)
        if verdict.release:
            LOG.warning('Secondary %s is lost or replaced: releasing it '
                        '(%s)', verdict.release, verdict.status,
                        instance=instance)
            if not self.driver._release_secondary(
                    context, instance, status=verdict.status):
                return          # recorded; the next tick tries again
        elif verdict.status:
            LOG.info('ft_status: %s', verdict.status, instance=instance)
            self.driver._set_status(instance, verdict.status)
        elif self._mirror_off(instance):
            LOG.info('ft_status in the server\'s metadata was %r: '
                     'written back', instance.metadata.get(STATUS),
                     instance=instance)
            instance.metadata[STATUS] = instance.system_metadata[STATUS]
            instance.save()
        if verdict.reprotect:
            self._reprotect_soon(context, instance,
                                 avoid=verdict.release)
        else:
            with self._lock:
                self._next_try.pop(instance.uuid, None)

    @staticmethod
    def _mirror_off(instance: Any) -> bool:
        return bool(instance.metadata.get(STATUS) !=
                    instance.system_metadata.get(STATUS))

    def _judge(self, instance: Any,
               live: Optional[dict[str, InstanceStatus]]
               ) -> live_status.Verdict:
        sysmeta = instance.system_metadata
        secondary = sysmeta.get(SECONDARY_HOST) or None
        if live is None or instance.host != self.host or \
                instance.vm_state != vm_states.ACTIVE or \
                not (secondary or self.driver._ft_asked(instance)):
            return live_status.Verdict()
        return live_status.judge(str(sysmeta.get(STATUS) or ''),
                                 secondary, live.get(instance.uuid))

    # -- re-protection --

    def _reprotect_soon(self, context: Any, instance: Any,
                        avoid: Optional[str]) -> None:
        status = str(instance.system_metadata.get(STATUS) or '')
        if status.startswith(FAILED_OVER) and \
                not self.driver.reprotect_after_handoff:
            return
        uuid_ = instance.uuid
        with self._lock:
            now = time.monotonic()
            if uuid_ in self._busy or now < self._next_try.get(uuid_, now):
                return
            self._busy.add(uuid_)
            self._next_try[uuid_] = now + self.retry_interval
        threading.Thread(
            target=self._reprotect, args=(context, uuid_, avoid),
            name=f'mftvm-reprotect-{uuid_}', daemon=True).start()

    def _reprotect(self, context: Any, uuid_: str,
                   avoid: Optional[str]) -> None:
        try:
            with lockutils.lock(uuid_, LOCK_PREFIX, do_log=False):
                instance = instance_obj.Instance.get_by_uuid(
                    context, uuid_,
                    expected_attrs=['system_metadata', 'metadata',
                                    'flavor'])
                if instance.host != self.host or \
                        instance.vm_state != vm_states.ACTIVE or \
                        instance.task_state is not None or \
                        instance.system_metadata.get(SECONDARY_HOST):
                    return      # moved, stopped, or protected meanwhile
                try:
                    request = ft_request.for_instance(instance)
                except ft_request.InvalidFTRequest as exc:
                    self.driver._set_status(instance, f'error: {exc}')
                    return
                if not request.enabled:
                    return
                LOG.info('Re-protecting this instance, which runs '
                         'unprotected%s', f' (not onto {avoid})'
                         if avoid else '', instance=instance)
                self.driver._protect(context, instance,
                                     instance.image_meta, request,
                                     avoid=(avoid,) if avoid else ())
        except Exception:
            LOG.exception('Re-protecting instance %s failed', uuid_)
        finally:
            with self._lock:
                self._busy.discard(uuid_)
                self._changed_at[uuid_] = time.monotonic()
