"""Hand an FT server's Nova record to the host that took it over.

When the primary host of a protected server fails, the agent on the
secondary's host fences it and runs the guest from the last committed
epoch (see doc/architecture.rst, *Failover*). Nova still believes the
server runs on the old host. This module moves Nova's record, as an evacuation
would, but without rebuilding anything: the guest is already running.

**Where it runs.** In nova-compute on the *new* host, which owns its
host's records (as the destination compute finishes an evacuation).
:class:`FTDriverMixin <mftvm_openstack.nova.driver.FTDriverMixin>`
starts a :class:`TakeoverWatcher` in ``init_host``: a daemon thread
that asks the local agent ``list()`` every ``handoff_interval`` seconds
(2 s) and hands off every instance :func:`taken_over` picks; it stops in
``cleanup_host``. A thread rather than one of the compute manager's
periodic tasks because those run every 60 s at best (and not at all in
Nova's functional harness), and a failover is measured in hundreds of
milliseconds. It is a plain ``threading.Thread``: a real thread in
Nova's threading mode (Nova 34's default, and its harness here), a green
thread under eventlet monkey patching. The admin context is the one
``init_host`` runs with, so in Nova's harness it is targeted at the
compute's cell, as the manager's own is.

**What "taken over" means.** The agent on this host lists the instance
(an :class:`~mftvm_openstack.contract.status.InstanceStatus`) with role
``primary``, a running ``state`` (:data:`RUNNING_STATES`) and not
``alive: False``, while Nova's ``instance.host`` is another
host, and Nova recorded this host as its secondary
(``system_metadata['ft_secondary_host']``). The agent's fencing (a tooz
lock) is what guarantees a single runner; Nova only follows.

**The hand-off** (:func:`hand_off`), under the instance's lock, each
step safe to repeat if a previous attempt died half way::

    Migration(type=evacuation, status=pre-migrating,
              source=old host/node, dest=this host/node)   (reused if
                                                             already there)
    Placement: move_allocations(secondary consumer -> instance)
    Neutron:   setup_instance_network_on_host(this host)
    Instance:  host/node/compute_id = this host, power_state RUNNING,
               vm_state ACTIVE, task_state None, ft_secondary_* dropped,
               ft_status = 'failed-over from <old>; unprotected'
    Migration: status done; instance action 'ft-failover' recorded

*Placement.* This host already holds the FT secondary's allocation
(the flavor's resources, under the ``uuid5`` consumer of
:func:`~mftvm_openstack.nova.driver.secondary_consumer`). One atomic
``POST /allocations`` (microversion 1.28, both consumers' generations:
Nova's ``SchedulerReportClient.move_allocations``) empties the
secondary consumer and gives its allocation to the instance consumer,
replacing the old host's. Afterwards the instance is allocated on this
host only, the old host's usage for it is 0, and the secondary consumer
is gone. Repeated, it sees the secondary consumer empty and the
instance's allocation present and does nothing. What the secondary's
claim did not carry is not carried: resources of ports with QoS
resource requests, PCI, accelerators (FT servers use none of them yet).
With no secondary allocation at all (it was never held), the instance's
allocation on the old host's provider is rewritten onto this host's
compute node provider instead (:func:`move_allocation`).

*Neutron.* What the evacuation's destination does:
``network_api.setup_instance_network_on_host(ctxt, instance, host)``
sets each port's ``binding:host_id`` to this host (and the
``device_owner`` zone), then ``get_instance_nw_info`` refreshes the
info cache. No migration is passed: there is no migration context (no
PCI/SR-IOV mapping; ports with resource requests would need provider
mappings, which an FT server does not have). The VIFs on this host were
plugged before the takeover: while the agent here lists the instance as
a standby secondary (:func:`standing_by`) and Nova recorded this host as
its secondary, the driver's watcher calls ``plug_vifs`` (os-vif: the
taps of Nova 34's OVS/OVN VIFs, hybrid-plug bridges), as live
migration's ``pre_live_migration`` does on its destination, so that the
restored domain finds them (or, if no look saw it standing by, as it
begins to take over); they stay while it takes over (winning the fence
takes up to a lease; a look then must not take away the taps the
restore is about to open), and it unplugs them when the host stops
standing by without taking over. Moving ``binding:host_id`` is what
activates the binding here (with ML2/OVN, the port's requested-chassis
follows it).

*The old host.* Evacuation's rule applies unchanged: when its
nova-compute starts again, ``_destroy_evacuated_instances`` finds the
``done`` evacuation, destroys the local guest (the driver's ``destroy``
leaves agents and Placement alone: ``instance.host`` is not that host
any more), finds no allocation of the instance on its provider (a
warning, nothing to do) and marks the migration ``completed``. The
server is not started there: ``init_host`` only resumes instances whose
``instance.host`` is that host.

*Settling it* follows at once (the driver's, see
:mod:`~mftvm_openstack.nova.settle`): its disk is copied live into
``<instances_path>/<uuid>/disk`` and its domain made persistent, so
Nova's stop, start and hard reboot find what they expect.

*Deleting it afterwards* is the new host's business: its driver tells
its own agent ``stop_instance`` (``ft_status`` says it was handed off;
the agent's instance process runs the restored domain and stops it),
then LibvirtDriver's own ``destroy`` cleans up as for any server.

Re-protection onto a third host follows (``[ft] reprotect_after_handoff``,
on by default): a new secondary is chosen as at spawn, never
the old host, holds it under the same ``uuid5`` consumer, and the agent
is told ``protect(..., secondary_host=...)``. (An agent with ``[agent]
peers`` would re-protect on its own, outside Placement: leave ``peers``
empty under Nova.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Optional

import nova.objects as objects
from nova.compute import power_state, task_states, vm_states
from nova.objects import fields as nova_fields
from oslo_concurrency import lockutils
from oslo_log import log as logging

from mftvm_openstack.contract.record import ContractError
from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import InstanceStatus

LOG = logging.getLogger(__name__)

#: agent states in which the guest runs on the agent's host and is Nova's
#: to follow (UNPROTECTED is a primary that never moved)
RUNNING_STATES = frozenset({State.ACTIVE, State.PROTECTED, State.SYNCING})
#: the role of the agent's side that runs the guest
PRIMARY = Role.PRIMARY
#: secondary states whose host keeps the guest's VIFs plugged: ready to
#: take over, and taking over (winning the fence, then restoring onto
#: those very taps; it lists as a primary once the guest runs)
STANDING_BY_STATES = frozenset({State.STANDBY, State.FAILING_OVER})
#: the instance action recorded for a hand-off (``server event list``)
ACTION = 'ft-failover'

#: how ``ft_status`` of a handed-off instance starts
FAILED_OVER = 'failed-over from '

#: migration statuses of a hand-off that has started and not finished
_UNFINISHED = ['accepted', 'pre-migrating']

SECONDARY_HOST = 'ft_secondary_host'
#: system metadata: the host a hand-off took the server from (kept: its
#: new host's agent ran it from a replica, whatever ``ft_status`` says
#: later)
HANDED_OFF_FROM = 'ft_handed_off_from'
SECONDARY_NODE = 'ft_secondary_node'
SECONDARY_CONSUMER = 'ft_secondary_consumer'
STATUS = 'ft_status'


class HandoffError(Exception):
    """A hand-off step failed; the next poll tries again."""


def failed_over_status(old_host: str) -> str:
    """``ft_status`` after a hand-off::

        >>> failed_over_status('host1')
        'failed-over from host1; unprotected'
    """
    return f'{FAILED_OVER}{old_host}; {State.UNPROTECTED}'


def listed(entries: Iterable[Mapping[str, Any]], warn: bool = False
           ) -> Iterator[InstanceStatus]:
    """Each entry of an agent's ``list()`` as the typed status contract
    reads it; an entry it cannot read is left out (with a warning if
    ``warn``)::

        >>> [s.instance for s in listed([
        ...     {'instance': 'a', 'role': 'primary', 'state': 'active'},
        ...     {'role': 'nonsense'}])]
        ['a']
    """
    for entry in entries:
        try:
            yield InstanceStatus.from_dict(
                dict(entry) if isinstance(entry, Mapping) else entry,
                'list entry')
        except ContractError as exc:
            if warn:
                LOG.warning('The agent listed what this driver cannot '
                            'read: %s', exc)


def taken_over(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    """The instances an agent's ``list()`` shows running as primary.

    ``entries`` is what :meth:`AgentAPI.list
    <mftvm_openstack.agent.rpcapi.AgentAPI.list>` returns for one host::

        >>> taken_over([
        ...     {'instance': 'a', 'role': 'primary', 'state': 'active'},
        ...     {'instance': 'b', 'role': 'secondary', 'state': 'standby'},
        ...     {'instance': 'c', 'role': 'primary', 'state': 'protected',
        ...      'alive': False},
        ...     {'instance': 'd', 'role': 'primary', 'state': 'syncing'}])
        ['a', 'd']

    Whether Nova still places it elsewhere is :func:`hand_off`'s check.
    """
    out = []
    for status in listed(entries, warn=True):
        if status.role is not PRIMARY or \
                status.state not in RUNNING_STATES or \
                status.alive is False:
            continue
        if status.instance:
            out.append(status.instance)
    return out


def standing_by(entries: Iterable[Mapping[str, Any]]) -> list[str]:
    """The instances an agent's ``list()`` shows as a secondary ready to
    take over, or taking over now (:data:`STANDING_BY_STATES`)::

        >>> standing_by([
        ...     {'instance': 'a', 'role': 'secondary', 'state': 'standby'},
        ...     {'instance': 'b', 'role': 'secondary',
        ...      'state': 'waiting-for-primary'},
        ...     {'instance': 'c', 'role': 'primary', 'state': 'active'},
        ...     {'instance': 'd', 'role': 'secondary',
        ...      'state': 'failing-over'}])
        ['a', 'd']
    """
    out = []
    for status in listed(entries):      # (taken_over() warns)
        if status.role is Role.SECONDARY and \
                status.state in STANDING_BY_STATES and \
                status.alive is not False and status.instance:
            out.append(status.instance)
    return out


class TakeoverWatcher:
    """A daemon thread calling ``tick()`` every ``interval`` seconds.

    ``tick`` must not raise (an exception is logged, and the thread goes
    on). ``stop()`` wakes the thread and waits for it::

        watcher = TakeoverWatcher('host2', driver._ft_check_takeovers, 2)
        watcher.start()
        ...
        watcher.stop()
    """

    def __init__(self, host: str, tick: Callable[[], None],
                 interval: float) -> None:
        self.host = host
        self.tick = tick
        self.interval = float(interval)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f'mftvm-takeover-{self.host}',
            daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # never let the thread die
                LOG.exception('Checking for FT takeovers on %s failed',
                              self.host)


def find_node(context: Any, host: str, nodename: Optional[str]) -> Any:
    """This host's ComputeNode: ``nodename`` if given, else the only one.

    :raises HandoffError: no such node, or several and none named.
    """
    if nodename:
        try:
            return objects.ComputeNode.get_by_host_and_nodename(
                context, host, nodename)
        except Exception as exc:
            raise HandoffError(f'no compute node {nodename} on {host}: '
                               f'{exc}') from None
    nodes = objects.ComputeNodeList.get_all_by_host(context, host)
    if len(nodes) != 1:
        raise HandoffError(f'{len(nodes)} compute nodes on {host}; '
                           'which one runs the instance is unknown')
    return nodes[0]


def _migration(context: Any, instance: Any, node: Any) -> Any:
    """The hand-off's Migration: an unfinished one, or a new one."""
    filters = {'instance_uuid': instance.uuid,
               'migration_type': nova_fields.MigrationType.EVACUATION,
               'source_compute': instance.host,
               'dest_compute': node.host,
               'status': _UNFINISHED}
    found = objects.MigrationList.get_by_filters(context, filters)
    if found:
        return found[0]
    migration = objects.Migration(
        context, instance_uuid=instance.uuid,
        migration_type=nova_fields.MigrationType.EVACUATION,
        source_compute=instance.host, source_node=instance.node,
        dest_compute=node.host, dest_node=node.hypervisor_hostname,
        dest_compute_id=node.id,
        dest_host=str(node.host_ip) if node.host_ip else None,
        status='pre-migrating',
        # who asked: nobody but the failure; the owner's, so that its
        # owner sees it (an admin context has no user or project)
        user_id=instance.user_id, project_id=instance.project_id)
    migration.create()
    return migration


def move_allocation(context: Any, reportclient: Any, instance: Any,
                    consumer: str, node: Any) -> None:
    """Give the instance consumer this host's allocation, and only it.

    Normally the secondary ``consumer`` holds the flavor on ``node``'s
    provider: its allocation replaces the instance's, atomically.
    Without one (never held), the instance's allocation on other
    providers is put on ``node``'s provider (one PUT with the consumer
    generation).

    :raises HandoffError: Placement refused or could not be reached.
    """
    secondary = reportclient.get_allocs_for_consumer(context, consumer)
    if secondary.get('allocations'):
        if not reportclient.move_allocations(context, consumer,
                                             instance.uuid):
            raise HandoffError(f'Placement did not move the allocation '
                               f'of {consumer} to the instance')
    else:
        current = reportclient.get_allocs_for_consumer(context,
                                                       instance.uuid)
        allocations = current.get('allocations') or {}
        if list(allocations) != [node.uuid]:
            resources: dict[str, int] = {}
            for alloc in allocations.values():
                for rc, amount in alloc.get('resources', {}).items():
                    resources[rc] = resources.get(rc, 0) + amount
            payload = {
                'allocations': {node.uuid: {'resources': resources}},
                'consumer_generation': current.get('consumer_generation'),
                'project_id': instance.project_id,
                'user_id': instance.user_id}
            resp = reportclient.put(
                f'/allocations/{instance.uuid}', payload, version='1.28',
                global_request_id=context.global_id)
            if resp.status_code != 204:
                raise HandoffError(f'Placement refused the allocation on '
                                   f'{node.host}: HTTP {resp.status_code}')
    after = reportclient.get_allocs_for_consumer(context, instance.uuid)
    if list(after.get('allocations') or {}) != [node.uuid]:
        raise HandoffError(f'the instance is allocated on '
                           f'{sorted(after.get("allocations") or {})}, not '
                           f'on {node.uuid} only')


def hand_off(context: Any, instance: Any, host: str, *,
             network_api: Any, reportclient: Any,
             consumer: str) -> Optional[Any]:
    """Move ``instance``'s Nova record to ``host``, which runs it now.

    ``instance`` is loaded with ``system_metadata`` and ``metadata``;
    ``consumer`` is the secondary's Placement consumer. Returns the
    finished Migration, or None when there was nothing to do (already
    here, being deleted, or this host was not its secondary).

    :raises HandoffError: a step failed; what was done stays done and a
        later call carries on.
    """
    # the lock of nova.utils.synchronized(instance.uuid), as the compute
    # manager takes it around its operations on the instance
    with lockutils.lock(instance.uuid, 'nova-'):
        instance.refresh()
        old_host, old_node = instance.host, instance.node
        sysmeta = instance.system_metadata
        if old_host == host:
            return None
        if sysmeta.get(SECONDARY_HOST) != host:
            LOG.warning('The agent on %s runs this instance as primary, '
                        'but Nova records %s as its secondary host: not '
                        'handing it off', host, sysmeta.get(SECONDARY_HOST),
                        instance=instance)
            return None
        if instance.vm_state in (vm_states.DELETED, vm_states.SOFT_DELETED) \
                or instance.task_state == task_states.DELETING:
            LOG.info('Not handing off an instance being deleted',
                     instance=instance)
            return None
        node = find_node(context, host, sysmeta.get(SECONDARY_NODE))
        LOG.info('The agent on %s took this instance over from %s: '
                 'handing Nova\'s record over', host, old_host,
                 instance=instance)

        migration = _migration(context, instance, node)
        move_allocation(context, reportclient, instance, consumer, node)
        try:
            network_api.setup_instance_network_on_host(
                context, instance, host)
        except Exception as exc:
            raise HandoffError(f'Neutron port binding not moved to '
                               f'{host}: {exc}') from exc

        task_state = instance.task_state
        instance.host = host
        instance.node = node.hypervisor_hostname
        instance.compute_id = node.id
        instance.power_state = power_state.RUNNING
        instance.vm_state = vm_states.ACTIVE
        instance.task_state = None
        for key in (SECONDARY_HOST, SECONDARY_NODE, SECONDARY_CONSUMER):
            sysmeta.pop(key, None)
        status = failed_over_status(old_host)
        sysmeta[HANDED_OFF_FROM] = old_host
        sysmeta[STATUS] = status
        instance.metadata[STATUS] = status
        instance.save(expected_task_state=[task_state])
        try:
            network_api.get_instance_nw_info(context, instance)
        except Exception as exc:  # the cache heals on its own later
            LOG.warning('Network info cache not refreshed: %s', exc,
                        instance=instance)

        migration.status = 'done'
        migration.save()
        _record_action(context, instance.uuid)
        LOG.info('Handed off from %s (node %s) to %s (node %s)', old_host,
                 old_node, host, node.hypervisor_hostname,
                 instance=instance)
        return migration


def _record_action(context: Any, instance_uuid: str) -> None:
    """An instance action ``ft-failover``, for ``server event list``."""
    try:
        objects.InstanceAction.action_start(
            context, instance_uuid, ACTION, want_result=False)
        objects.InstanceAction.action_finish(
            context, instance_uuid, want_result=False)
    except Exception as exc:
        LOG.warning('Instance action %s not recorded: %s', ACTION, exc)
