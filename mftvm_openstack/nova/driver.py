"""The Nova compute driver: libvirt, plus a secondary for FT servers.

``FTLibvirtDriver`` is Nova's ``LibvirtDriver`` with
:class:`FTDriverMixin` in front. Configure nova-compute with::

    [DEFAULT]
    compute_driver = mftvm.FTLibvirtDriver

A server that does not ask for fault tolerance is left to
``LibvirtDriver`` alone. For one that does, ``spawn`` chooses a secondary
host among Placement's candidates and holds it there
(:mod:`~mftvm_openstack.nova.secondary_placement`), and tells the agents
to protect the guest; stop, start, reboot and destroy keep the agents in
step, and moves are refused, as is what cannot be protected yet
(volumes, extra disks and ports:
:mod:`~mftvm_openstack.nova.protectable`). Between operations,
``ft_status`` and the secondary's hold follow the agent, and a lost
secondary is replaced (:mod:`~mftvm_openstack.nova.status`). The
design (how the secondary is chosen and held, what each operation does,
why) is in ``doc/nova-driver.rst``; what operators and tenants see is in
``doc/admin.rst``.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, Optional

import nova.compute.vm_states as vm_states
import nova.conf as nova_conf
import nova.context as nova_context
import nova.exception as nova_exception
import nova.objects.instance as instance_obj
import nova.objects.service as service_obj
import nova.virt.configdrive as configdrive
import nova.virt.driver as virt_driver
from nova.compute import power_state
from nova.network import neutron as neutron_api
from nova.scheduler.client import report as scheduler_report
from nova.servicegroup import api as servicegroup_api
from nova.virt.libvirt import blockinfo
from nova.virt.libvirt import driver as libvirt_driver
from nova.virt.libvirt import utils as libvirt_utils
from oslo_log import log as logging

from mftvm_openstack import conf as mftvm_conf
from mftvm_openstack import files
from mftvm_openstack.agent import exception as agent_exception
from mftvm_openstack.agent import rpcapi
from mftvm_openstack.contract.states import State
from mftvm_openstack.nova import (
    ft_request,
    handoff,
    nic_checksum,
    protectable,
    secondary_choice,
    secondary_placement,
    settle,
    steering,
    volumes,
)
from mftvm_openstack.nova.status import StatusKeeper

LOG = logging.getLogger(__name__)

#: system metadata: the secondary's host, node and Placement consumer
SECONDARY_HOST = 'ft_secondary_host'
SECONDARY_NODE = 'ft_secondary_node'
SECONDARY_CONSUMER = 'ft_secondary_consumer'
#: system metadata and server metadata: where protection stands
STATUS = 'ft_status'

# ft_status is for people: the agent's state where there is one, else
# what the driver is doing
STATUS_PROTECTING = 'protecting'
STATUS_PROTECTED = State.PROTECTED.value
STATUS_NO_SECONDARY = f'{State.UNPROTECTED}: no secondary host'
STATUS_HOST_UNABLE = f'{State.UNPROTECTED}: this host cannot protect'
STATUS_STOPPED = State.STOPPED.value
STATUS_REBOOTING = f'{State.UNPROTECTED}: rebooting'
STATUS_PAUSED = f'{State.UNPROTECTED}: paused'
STATUS_SUSPENDED = f'{State.UNPROTECTED}: suspended'
STATUS_FT_OFF = f'{State.UNPROTECTED}: ft off'
STATUS_RESCUED = f'{State.UNPROTECTED}: rescued'
STATUS_SNAPSHOT = f'{State.UNPROTECTED}: taking a snapshot'
STATUS_INTERFACES = f'{State.UNPROTECTED}: changing interfaces'

#: why a move of an FT server is refused (``%(what)s``: 'Resize or cold
#: migration', 'Live migration'; ``%(remedy)s``: one of the two below).
#: Kept short: Nova cuts instance fault messages and action event details
#: at 255 characters, its own prefix included
MOVE_REFUSED = ('%(what)s of a fault-tolerant instance is refused (its '
                'secondary would not follow): %(remedy)s')
REMEDY_METADATA = 'unprotect it first (unset the ft server property)'
REMEDY_FLAVOR = ('its flavor asks for FT (ft:enabled): boot a snapshot of '
                 'it with another flavor')

#: why an evacuation of an FT server is refused (``%(remedy)s``: one of
#: the remedies above). Its secondary's agent takes it over once it has
#: won the guest's fence; an evacuation would start another copy from
#: the image or a shared disk, fenced by nobody
EVACUATE_REFUSED = ('Evacuation of a fault-tolerant instance is refused '
                    '(its secondary takes over, fenced): %(remedy)s')

#: namespace of :func:`secondary_consumer`
CONSUMER_NAMESPACE = uuid.UUID('5d0e8a39-4f4b-5b8e-9e0f-6d6674766d01')

_STATUS_MAX = 255     # instance_metadata.value is a VARCHAR(255)


def secondary_consumer(instance_uuid: str) -> str:
    """The Placement consumer holding an instance's secondary resources.

    Stable (``uuid5``), so any host can find it from the instance::

        >>> secondary_consumer('2b4f0c71-2f0b-4fd8-9e5d-0b1b5d0a7a11')
        '4af21d84-4048-5201-8285-522db2de0524'
    """
    return str(uuid.uuid5(CONSUMER_NAMESPACE, str(instance_uuid)))


def domain_spec(instance: Any) -> dict[str, Any]:
    """The ``spec`` of the agent's ``protect`` for a libvirt domain."""
    return {
        'name': instance.uuid,
        'domain': instance.name,
        'memory_mib': instance.flavor.memory_mb,
        'smp': instance.flavor.vcpus,
    }


def default_agent_api() -> rpcapi.AgentAPI:
    """An agent client on ``[DEFAULT] transport_url`` (nova.conf's)."""
    return rpcapi.AgentAPI(rpcapi.get_transport(mftvm_conf.CONF))


def _status(status: str, error: Optional[str]) -> str:
    """``status``, with the error of getting there appended if any."""
    return status if error is None else f'{status}; {error}'


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().split('\n', 1)[0] or type(exc).__name__
    return text


class FTDriverMixin:
    """Fault tolerance for the compute driver it is mixed in front of.

    Only FT servers are touched; everything else goes to ``super()``.
    ``agent_api_factory`` builds the agent client on first use (tests
    replace it with a fake).
    """

    agent_api_factory: Callable[[], Any] = staticmethod(default_agent_api)
    @property
    def handoff_interval(self) -> float:
        """Seconds between two looks at the local agent for takeovers
        (:mod:`~mftvm_openstack.nova.handoff`); 0 turns the watch off."""
        return float(mftvm_conf.CONF.ft.handoff_interval)

    @property
    def reprotect_after_handoff(self) -> bool:
        """After a hand-off, choose a new secondary (not the old
        primary's host) and tell the agent to protect onto it."""
        return bool(mftvm_conf.CONF.ft.reprotect_after_handoff)

    _ft_host: Optional[str] = None
    _ft_agent_api: Any = None
    _ft_watcher: Optional[handoff.TakeoverWatcher] = None
    _ft_status_keeper: Optional[StatusKeeper] = None
    _ft_context: Any = None
    _ft_list_failing: bool = False
    #: ``[libvirt] file_backed_memory`` as nova-compute started with it
    _ft_file_backed_mib: Optional[int] = None
    #: instance uuid -> why the watcher leaves it alone while the agent
    #: lists it ('runs here', 'handed off', ...)
    _ft_seen: dict[str, str]
    #: instance uuid -> (instance, network info) of the VIFs plugged here
    #: while this host stands by for it
    _ft_plugged: dict[str, tuple[Any, Any]]
    #: instances the mixin restarts now (power_on, reboot): the
    #: ``destroy`` LibvirtDriver does inside is not a deletion
    _ft_restarting_uuids: Optional[set[str]] = None

    # -- Nova's driver interface ----------------------------------------

    def init_host(self, host: str) -> Any:
        self._ft_host = host
        self._ft_file_backed_mib = nova_conf.CONF.libvirt.file_backed_memory
        result = super().init_host(host)  # type: ignore[misc]
        # the manager's own admin context at start-up: in Nova's harness
        # it is the one targeted at this compute's cell
        self._ft_context = nova_context.get_admin_context()
        self._ft_seen = {}
        self._ft_plugged = {}
        if self.handoff_interval > 0:
            # ft_status kept true at each look (mftvm_openstack.nova.status)
            self._ft_status_keeper = StatusKeeper(self, host)
            self._ft_watcher = handoff.TakeoverWatcher(
                host, self._ft_check_takeovers, self.handoff_interval)
            self._ft_watcher.start()
        return result

    def cleanup_host(self, host: str) -> None:
        watcher, self._ft_watcher = self._ft_watcher, None
        if watcher is not None:
            watcher.stop()
        super().cleanup_host(host)  # type: ignore[misc]

    def update_provider_tree(self, provider_tree: Any, nodename: str,
                             allocations: Any = None) -> None:
        super().update_provider_tree(  # type: ignore[misc]
            provider_tree, nodename, allocations=allocations)
        # the trait that steers FT servers and secondaries here (see
        # mftvm_openstack.nova.steering); ours, so set and removed here
        if self._ft_unable() is None:
            provider_tree.add_traits(nodename, steering.TRAIT)
        else:
            provider_tree.remove_traits(nodename, steering.TRAIT)

    def spawn(self, context: Any, instance: Any, image_meta: Any,
              injected_files: Any, admin_password: Any, allocations: Any,
              network_info: Any = None, block_device_info: Any = None,
              power_on: bool = True, accel_info: Any = None) -> None:
        request = self._ft_request(instance)
        if request.enabled:
            self._refuse_unprotectable_build(instance, block_device_info,
                                             network_info)
        super().spawn(  # type: ignore[misc]
            context, instance, image_meta, injected_files, admin_password,
            allocations, network_info=network_info,
            block_device_info=block_device_info, power_on=power_on,
            accel_info=accel_info)
        if request.enabled:
            self._protect(context, instance, image_meta, request,
                          block_device_info=block_device_info,
                          network_info=network_info)

    def destroy(self, context: Any, instance: Any, network_info: Any,
                block_device_info: Any = None, destroy_disks: bool = True,
                destroy_secrets: bool = True) -> None:
        if instance.uuid in self._ft_restarting:
            # LibvirtDriver's hard reboot (power_on too) re-creating the
            # domain: the server stays, and so does its secondary
            super().destroy(  # type: ignore[misc]
                context, instance, network_info,
                block_device_info=block_device_info,
                destroy_disks=destroy_disks,
                destroy_secrets=destroy_secrets)
            return
        secondary = self._ft_secondary_to_release(instance)
        if secondary is not None:
            self._stop_agents(context, instance, secondary)
        elif self._ft_agent_may_hold(instance):
            # handed off here, no secondary (not re-protected, or lost
            # since): the agent here may run the guest (a takeover's
            # instance process restored the domain), or keep the replica
            # it ran from; it stops the one and lets the other go, and
            # LibvirtDriver then finds the domain gone
            self._stop_agents(context, instance, None)
        super().destroy(  # type: ignore[misc]
            context, instance, network_info,
            block_device_info=block_device_info,
            destroy_disks=destroy_disks, destroy_secrets=destroy_secrets)
        if secondary is not None:
            self._release_secondary(context, instance)

    def power_off(self, instance: Any, timeout: int = 0,
                  retry_interval: int = 0) -> None:
        ft = self._ft_lifecycle(instance)
        # a guest stopped already (by itself, or a shelve's offload after
        # its stop) has no protection left to end
        error = self._unprotect_held(instance) \
            if ft and self._ft_guest_runs(instance) else None
        super().power_off(  # type: ignore[misc]
            instance, timeout=timeout, retry_interval=retry_interval)
        if ft:
            self._set_status(instance, _status(STATUS_STOPPED, error))

    def power_on(self, context: Any, instance: Any, network_info: Any,
                 block_device_info: Any = None, accel_info: Any = None,
                 share_info: Any = None) -> None:
        with self._ft_restart(instance):
            super().power_on(  # type: ignore[misc]
                context, instance, network_info,
                block_device_info=block_device_info,
                accel_info=accel_info, share_info=share_info)
        if self._ft_lifecycle(instance):
            self._reprotect(context, instance)

    # A paused or suspended guest is no guest to checkpoint: each epoch
    # ends with ``cont``, which would undo a pause. So protection ends
    # first (the secondary stays held) and resumes afterwards.

    def pause(self, instance: Any) -> None:
        self._ft_hold(instance, STATUS_PAUSED)
        super().pause(instance)  # type: ignore[misc]

    def unpause(self, instance: Any) -> None:
        super().unpause(instance)  # type: ignore[misc]
        if self._ft_lifecycle(instance):
            self._reprotect(nova_context.get_admin_context(), instance)

    def suspend(self, context: Any, instance: Any) -> None:
        self._ft_hold(instance, STATUS_SUSPENDED)
        super().suspend(context, instance)  # type: ignore[misc]

    def resume(self, context: Any, instance: Any, network_info: Any,
               block_device_info: Any = None,
               share_info: Any = None) -> None:
        super().resume(  # type: ignore[misc]
            context, instance, network_info,
            block_device_info=block_device_info, share_info=share_info)
        if self._ft_lifecycle(instance):
            self._reprotect(context, instance)

    def _ft_hold(self, instance: Any, status: str) -> None:
        """Unprotect ``instance`` before it stops running, secondary kept."""
        if self._ft_lifecycle(instance):
            self._set_status(instance, _status(
                status, self._unprotect_held(instance)))

    def _unprotect_held(self, instance: Any) -> Optional[str]:
        """Unprotect ``instance`` if it holds a secondary (which stays
        held); the error to record, if any."""
        if not self._ft_secondary(instance):
            return None
        return self._unprotect(nova_context.get_admin_context(), instance)

    def reboot(self, context: Any, instance: Any, network_info: Any,
               reboot_type: str, block_device_info: Any = None,
               bad_volumes_callback: Any = None, accel_info: Any = None,
               share_info: Any = None) -> None:
        ft = self._ft_lifecycle(instance)
        if ft and self._ft_secondary(instance):
            error = self._unprotect(context, instance)
            self._set_status(instance, _status(STATUS_REBOOTING, error))
        with self._ft_restart(instance):
            super().reboot(  # type: ignore[misc]
                context, instance, network_info, reboot_type,
                block_device_info=block_device_info,
                bad_volumes_callback=bad_volumes_callback,
                accel_info=accel_info, share_info=share_info)
        if ft:
            self._reprotect(context, instance)

    def migrate_disk_and_power_off(self, context: Any, instance: Any,
                                   dest: str, flavor: Any,
                                   network_info: Any,
                                   block_device_info: Any = None,
                                   timeout: int = 0,
                                   retry_interval: int = 0) -> Any:
        reason = self._ft_move_refused(instance,
                                       'Resize or cold migration')
        if reason is not None:
            raise nova_exception.InstanceFaultRollback(
                nova_exception.MigrationPreCheckError(reason=reason))
        self._drop_leftover_secondary(context, instance)
        return super().migrate_disk_and_power_off(  # type: ignore[misc]
            context, instance, dest, flavor, network_info,
            block_device_info=block_device_info, timeout=timeout,
            retry_interval=retry_interval)

    def check_can_live_migrate_destination(
            self, context: Any, instance: Any, src_compute_info: Any,
            dst_compute_info: Any, block_migration: bool = False,
            disk_over_commit: bool = False) -> Any:
        # the source's driver may be another: refuse here too, first
        self._refuse_live_migration(instance)
        return super().check_can_live_migrate_destination(  # type: ignore
            context, instance, src_compute_info, dst_compute_info,
            block_migration=block_migration,
            disk_over_commit=disk_over_commit)

    def check_can_live_migrate_source(self, context: Any, instance: Any,
                                      dest_check_data: Any,
                                      block_device_info: Any = None) -> Any:
        self._refuse_live_migration(instance)
        self._drop_leftover_secondary(context, instance)
        return super().check_can_live_migrate_source(  # type: ignore[misc]
            context, instance, dest_check_data,
            block_device_info=block_device_info)

    # Disks and ports cannot be added to a server that asks for FT (see
    # mftvm_openstack.nova.protectable). Each refusal sits at the first
    # driver call of Nova's operation, before anything changes.

    def get_device_name_for_instance(self, instance: Any, bdms: Any,
                                     block_device_obj: Any) -> Any:
        # a volume attach's reserve_block_device_name (an RPC call: the
        # API answers 400 with the reason): its new mapping is not saved
        # yet; the build's and rebuild's mappings are
        if (getattr(block_device_obj, 'source_type', None) == 'volume' and
                not block_device_obj.obj_attr_is_set('id')):
            self._refuse_change(instance, protectable.ATTACH_VOLUME,
                                nova_exception.InvalidVolume)
        return super().get_device_name_for_instance(  # type: ignore[misc]
            instance, bdms, block_device_obj)

    def network_binding_host_id(self, context: Any, instance: Any) -> Any:
        # the first driver call of attach_interface (an RPC call: the API
        # answers 400 with the reason), before any port is touched; a
        # build's (vm_state building) goes on: spawn judges the ports
        if getattr(instance, 'vm_state', None) != vm_states.BUILDING:
            self._refuse_change(instance, protectable.ATTACH_INTERFACE,
                                nova_exception.AttachInterfaceNotSupported)
        return super().network_binding_host_id(  # type: ignore[misc]
            context, instance)

    def detach_volume(self, context: Any, connection_info: Any,
                      instance: Any, mountpoint: str,
                      encryption: Any = None) -> None:
        # a cast: Nova rolls Cinder's detaching back, the volume stays
        # attached and the reason is the instance fault. Refused while
        # the server holds a secondary, whose domain has the disk (its
        # restore would not load the device state without it); a server
        # being deleted or shelved is destroyed first, which ends that
        if self._ft_secondary(instance):
            self._refuse_change(instance, protectable.DETACH_VOLUME,
                                nova_exception.InvalidVolume)
        super().detach_volume(  # type: ignore[misc]
            context, connection_info, instance, mountpoint,
            encryption=encryption)

    def swap_volume(self, context: Any, old_connection_info: Any,
                    new_connection_info: Any, instance: Any,
                    mountpoint: str, resize_to: int) -> None:
        # a cast: Nova rolls Cinder's attachments back, the guest is
        # untouched, the reason is the instance fault
        self._refuse_change(instance, protectable.SWAP_VOLUME,
                            nova_exception.InvalidVolume)
        super().swap_volume(  # type: ignore[misc]
            context, old_connection_info, new_connection_info, instance,
            mountpoint, resize_to)

    # -- rescue, snapshot, interfaces, evacuation -------------------------
    # Each changes the guest under the engine. Rescue and a snapshot that
    # is not live stop its QEMU, which the secondary would take for a lost
    # primary (a failover: two copies); a live snapshot's block job would
    # cancel the disk mirror; a plugged or unplugged interface makes the
    # domain XML the secondary holds wrong (its restore would not load the
    # device state). So protection ends first, the secondary held, and
    # starts again (a new HELLO, the domain's XML as it is now) once the
    # guest runs as it will run on.

    def rescue(self, context: Any, instance: Any, network_info: Any,
               image_meta: Any, rescue_password: Any,
               block_device_info: Any, share_info: Any) -> None:
        if self._ft_guest_runs(instance):
            self._ft_hold(instance, STATUS_RESCUED)
        elif self._ft_lifecycle(instance):
            # Nova stopped it first (power_off unprotected it): say why
            # it stays unprotected, the stop's error kept
            status = str(instance.system_metadata.get(STATUS) or '')
            if status.startswith(STATUS_STOPPED):
                self._set_status(instance, STATUS_RESCUED +
                                 status[len(STATUS_STOPPED):])
        super().rescue(  # type: ignore[misc]
            context, instance, network_info, image_meta, rescue_password,
            block_device_info, share_info)

    def unrescue(self, context: Any, instance: Any) -> None:
        super().unrescue(context, instance)  # type: ignore[misc]
        if self._ft_lifecycle(instance):
            self._reprotect(context, instance)

    def snapshot(self, context: Any, instance: Any, image_id: Any,
                 update_task_state: Any) -> None:
        with self._ft_unprotected(context, instance, STATUS_SNAPSHOT):
            super().snapshot(  # type: ignore[misc]
                context, instance, image_id, update_task_state)

    def attach_interface(self, context: Any, instance: Any,
                         image_meta: Any, vif: Any) -> None:
        with self._ft_unprotected(context, instance, STATUS_INTERFACES):
            super().attach_interface(  # type: ignore[misc]
                context, instance, image_meta, vif)

    def detach_interface(self, context: Any, instance: Any,
                         vif: Any) -> None:
        with self._ft_unprotected(context, instance, STATUS_INTERFACES):
            super().detach_interface(  # type: ignore[misc]
                context, instance, vif)

    def instance_on_disk(self, instance: Any) -> bool:
        # Nova asks this of an evacuation's destination only, before it
        # touches the guest, its disks or its ports: the place to refuse.
        # InstanceFaultRollback keeps the server's state as it was
        reason = self._ft_evacuation_refused(instance)
        if reason is not None:
            raise nova_exception.InstanceFaultRollback(
                nova_exception.BuildAbortException(
                    instance_uuid=instance.uuid, reason=reason))
        return bool(super().instance_on_disk(  # type: ignore[misc]
            instance))

    def _ft_guest_runs(self, instance: Any) -> bool:
        """``instance`` is the agents' business and its guest runs now
        (a stopped or paused FT server is unprotected already).

        A domain paused while Nova did not pause the server runs: the
        engine pauses it for every checkpoint (and while held output is
        at its bound), so a look often finds it paused; taken for a
        stopped guest, Nova's stop would go on with protection on, and
        its destroy would fail the guest over instead.
        """
        if not self._ft_lifecycle(instance):
            return False
        try:
            state = self.get_info(instance).state  # type: ignore[attr-defined]
        except nova_exception.InstanceNotFound:
            return False
        if state == power_state.PAUSED:
            return bool(getattr(instance, 'vm_state', None) !=
                        vm_states.PAUSED)
        return bool(state == power_state.RUNNING)

    @contextlib.contextmanager
    def _ft_unprotected(self, context: Any, instance: Any,
                        status: str) -> Iterator[None]:
        """Protection off around what the block does to the running
        guest, on again afterwards (also if it failed: the guest runs)."""
        if not self._ft_guest_runs(instance):
            yield
            return
        self._ft_hold(instance, status)
        try:
            yield
        finally:
            if self._ft_guest_runs(instance):
                self._reprotect(context, instance)

    def _ft_evacuation_refused(self, instance: Any) -> Optional[str]:
        if not self._ft_asked(instance):
            return None
        reason = EVACUATE_REFUSED % {
            'remedy': REMEDY_FLAVOR if self._ft_by_flavor(instance)
            else REMEDY_METADATA}
        LOG.warning('Refused: %s', reason, instance=instance)
        return reason

    # -- FT --------------------------------------------------------------

    @property
    def agent_api(self) -> Any:
        if self._ft_agent_api is None:
            self._ft_agent_api = type(self).agent_api_factory()
        return self._ft_agent_api

    @staticmethod
    def _ft_request(instance: Any) -> ft_request.FTRequest:
        """The server's FT request; a bad one aborts the build."""
        try:
            return ft_request.for_instance(instance)
        except ft_request.InvalidFTRequest as exc:
            raise nova_exception.BuildAbortException(
                instance_uuid=instance.uuid, reason=str(exc)) from None

    def _protect(self, context: Any, instance: Any, image_meta: Any,
                 request: ft_request.FTRequest,
                 avoid: tuple[str, ...] = (),
                 block_device_info: Any = None,
                 network_info: Any = None) -> None:
        primary = instance.host
        cannot = self._ft_cannot_protect(instance, block_device_info,
                                         network_info)
        if cannot is not None:
            self._ft_unprotectable(instance, cannot)
            return
        unable = self._ft_unable()
        if unable is not None:
            # e.g. ft=true in its metadata, which the scheduler cannot see
            LOG.warning('This host cannot protect the instance, which '
                        'runs unprotected: %s', unable, instance=instance)
            self._set_status(instance, f'{STATUS_HOST_UNABLE} ({unable})')
            return
        try:
            chosen = self._select_secondary(context, instance,
                                            image_meta, primary, avoid)
        except secondary_choice.NoSecondary as exc:
            self._degraded(instance, _one_line(exc))
            return
        except Exception as exc:  # Placement or the conductor down, ...
            LOG.exception('Could not choose a secondary host through '
                          'Placement', instance=instance)
            self._degraded(instance, _one_line(exc))
            return

        sysmeta = instance.system_metadata
        sysmeta[SECONDARY_HOST] = chosen.host
        sysmeta[SECONDARY_NODE] = chosen.node
        sysmeta[SECONDARY_CONSUMER] = secondary_consumer(instance.uuid)
        self._set_status(instance, STATUS_PROTECTING)
        LOG.info('Secondary host %s (node %s) holds resources for this '
                 'instance', chosen.host, chosen.node, instance=instance)
        self._protect_onto(context, instance, request, chosen.host)

    def _protect_onto(self, context: Any, instance: Any,
                      request: ft_request.FTRequest,
                      secondary: str) -> None:
        """Tell the primary's agent to protect onto ``secondary``."""
        primary = instance.host
        try:
            self.agent_api.protect(
                context, primary, instance.uuid, domain_spec(instance),
                request.agent_options(), secondary_host=secondary)
        except Exception as exc:
            LOG.error('The agent on %s could not protect the instance '
                      'with secondary %s: %s', primary, secondary,
                      _one_line(exc), instance=instance)
            self._set_status(instance,
                             f'error: protect failed: {_one_line(exc)}')
            return
        self._set_status(instance, STATUS_PROTECTED)

    def _select_secondary(self, context: Any, instance: Any,
                          image_meta: Any, primary: str,
                          avoid: tuple[str, ...] = ()
                          ) -> secondary_choice.Chosen:
        """Choose, through Placement, a host other than ``primary``.

        Hosts in ``avoid`` are not chosen either. The flavor's resources
        are claimed there for :func:`secondary_consumer`. No call to
        nova-scheduler: a compute cannot reach it under cells v2's
        superconductor topology.
        """
        return secondary_placement.select(
            context, instance, image_meta,
            consumer=secondary_consumer(instance.uuid),
            exclude=secondary_choice.excluded_hosts(primary, avoid))

    # -- what cannot be protected (mftvm_openstack.nova.protectable) -----

    @staticmethod
    def _ft_cannot_protect(instance: Any, block_device_info: Any = None,
                           network_info: Any = None) -> Optional[str]:
        """What of ``instance`` cannot be protected, or None.

        From the spawn's ``block_device_info`` and ``network_info``, or,
        when not given, Nova's records (block device mappings, the
        network info cache).
        """
        if block_device_info is None:
            block_device_info = virt_driver.get_block_device_info(
                instance, instance.get_bdms())
        if network_info is None:
            network_info = instance.get_network_info()
        return protectable.cannot_protect(protectable.devices(
            instance.flavor, block_device_info, network_info,
            config_drive=configdrive.required_by(instance)),
            rbd_volumes=mftvm_conf.CONF.ft.rbd_volumes)

    def _refuse_unprotectable_build(self, instance: Any,
                                    block_device_info: Any,
                                    network_info: Any) -> None:
        """Abort the build of a server whose flavor requires FT and
        that cannot be protected (FT by metadata: see :meth:`_protect`)."""
        if not protectable.required_by_flavor(instance):
            return
        cannot = self._ft_cannot_protect(instance, block_device_info,
                                         network_info)
        if cannot is not None:
            reason = protectable.build_refused(
                cannot, rbd_volumes=mftvm_conf.CONF.ft.rbd_volumes)
            LOG.warning('Refused: %s', reason, instance=instance)
            raise nova_exception.BuildAbortException(
                instance_uuid=instance.uuid, reason=reason)

    def _ft_unprotectable(self, instance: Any, cannot: str) -> None:
        LOG.warning('This fault-tolerant instance runs unprotected: it '
                    'has %s', cannot, instance=instance)
        self._set_status(instance, protectable.status(cannot))

    def _refuse_change(self, instance: Any, what: str,
                       exc_type: type[Exception]) -> None:
        """Raise ``exc_type`` if ``instance`` asks for FT."""
        if not self._ft_asked(instance):
            return
        reason = protectable.change_refused(
            what, REMEDY_FLAVOR if protectable.required_by_flavor(instance)
            else REMEDY_METADATA)
        LOG.warning('Refused: %s', reason, instance=instance)
        raise exc_type(reason)

    def _ft_unable(self) -> Optional[str]:
        """Why this host cannot protect FT servers, or None (see
        :mod:`~mftvm_openstack.nova.steering`)."""
        mib = self._ft_file_backed_mib
        if mib is None:     # before init_host
            mib = nova_conf.CONF.libvirt.file_backed_memory
        return steering.why_not_capable(
            file_backed_memory_mib=int(mib),
            agent_answers=not self._ft_list_failing)

    # -- lifecycle: stop, start, reboot, moves ----------------------------

    @property
    def _ft_restarting(self) -> set[str]:
        if self._ft_restarting_uuids is None:
            self._ft_restarting_uuids = set()
        return self._ft_restarting_uuids

    @contextlib.contextmanager
    def _ft_restart(self, instance: Any) -> Iterator[None]:
        """While LibvirtDriver restarts ``instance``, ``destroy`` is its
        own (see :meth:`destroy`)."""
        self._ft_restarting.add(instance.uuid)
        try:
            yield
        finally:
            self._ft_restarting.discard(instance.uuid)

    @staticmethod
    def _ft_secondary(instance: Any) -> Optional[str]:
        sysmeta = getattr(instance, 'system_metadata', None) or {}
        secondary = sysmeta.get(SECONDARY_HOST)
        return str(secondary) if secondary else None

    @staticmethod
    def _ft_asked(instance: Any) -> bool:
        """The server's FT request is on (a bad one counts as on)."""
        try:
            return ft_request.for_instance(instance).enabled
        except ft_request.InvalidFTRequest:
            return True

    def _ft_lifecycle(self, instance: Any) -> bool:
        """Stop, start and reboot of ``instance`` concern the agents.

        It holds a secondary, or asks for FT and is not a server an
        agent here took over (the hand-off's business, not libvirt's).
        """
        if self._ft_secondary(instance):
            return True
        sysmeta = getattr(instance, 'system_metadata', None) or {}
        if str(sysmeta.get(STATUS) or '').startswith(handoff.FAILED_OVER):
            return False
        return self._ft_asked(instance)

    def _ft_move_refused(self, instance: Any, what: str) -> Optional[str]:
        """Why ``instance`` may not move, or None.

        It may once it no longer asks for FT, even while it still holds
        a secondary (see :meth:`_drop_leftover_secondary`).
        """
        if not self._ft_asked(instance):
            return None
        reason = MOVE_REFUSED % {
            'what': what,
            'remedy': REMEDY_FLAVOR if self._ft_by_flavor(instance)
            else REMEDY_METADATA}
        LOG.warning('Refused: %s', reason, instance=instance)
        return reason

    @staticmethod
    def _ft_by_flavor(instance: Any) -> bool:
        """The flavor asks for FT (its user cannot unset it)."""
        flavor = getattr(instance, 'flavor', None)
        specs = getattr(flavor, 'extra_specs', None) or {}
        try:
            return ft_request.parse_bool(
                ft_request.FLAVOR, ft_request.ENABLED,
                specs.get(ft_request.ENABLED, 'false'))
        except ft_request.InvalidFTRequest:
            return True

    def _drop_leftover_secondary(self, context: Any,
                                 instance: Any) -> None:
        """Before ``instance`` moves: if FT was turned off (the ``ft``
        property unset) while it still holds a secondary, stop the
        protection and release the secondary."""
        if not self._ft_secondary(instance) or self._ft_asked(instance):
            return
        error = self._unprotect(context, instance)
        self._release_secondary(context, instance,
                                status=_status(STATUS_FT_OFF, error))

    def _refuse_live_migration(self, instance: Any) -> None:
        reason = self._ft_move_refused(instance, 'Live migration')
        if reason is not None:
            raise nova_exception.NoValidHost(reason=reason)

    def _unprotect(self, context: Any, instance: Any) -> Optional[str]:
        """Tell the primary's agent to stop protecting ``instance``.

        Its agent tells the secondary's. Returns None, or the error for
        ``ft_status`` (logged; never raised).
        """
        try:
            self.agent_api.unprotect(context, instance.host, instance.uuid)
        except Exception as exc:
            LOG.error('The agent on %s could not unprotect the instance: '
                      '%s', instance.host, _one_line(exc),
                      instance=instance)
            return f'error: unprotect failed: {_one_line(exc)}'
        return None

    def _reprotect(self, context: Any, instance: Any) -> None:
        """Protect ``instance`` again once it runs (start, reboot).

        Onto its recorded secondary while that is still valid, else onto
        a newly selected one (see the module's docstring).
        """
        try:
            request = ft_request.for_instance(instance)
        except ft_request.InvalidFTRequest as exc:
            LOG.warning('Not re-protected: %s', exc, instance=instance)
            self._set_status(instance, f'error: {_one_line(exc)}')
            return
        secondary = self._ft_secondary(instance)
        if secondary is not None and not request.enabled:
            # FT was turned off while it was stopped: let its secondary go
            if self._release_secondary(context, instance, status=None):
                self._set_status(instance, STATUS_FT_OFF)
            return
        cannot = (self._ft_cannot_protect(instance)
                  if request.enabled else None)
        if cannot is not None:
            # e.g. ft=true set on a server with volumes, then rebooted
            if secondary is None or self._release_secondary(
                    context, instance, status=None):
                self._ft_unprotectable(instance, cannot)
            return
        if secondary is not None:
            invalid = self._secondary_invalid(context, instance, secondary)
            if invalid is None:
                self._set_status(instance, STATUS_PROTECTING)
                self._protect_onto(context, instance, request, secondary)
                return
            LOG.info('Secondary %s no longer fit (%s): choosing another',
                     secondary, invalid, instance=instance)
            if not self._release_secondary(context, instance, status=None):
                return
        if not request.enabled:
            # FT was turned off while it had a secondary: now released
            self._set_status(instance, STATUS_FT_OFF)
            return
        self._protect(context, instance, instance.image_meta, request,
                      avoid=(secondary,) if secondary else ())

    def _secondary_invalid(self, context: Any, instance: Any,
                           secondary: str) -> Optional[str]:
        """Why the recorded secondary can no longer serve, or None."""
        consumer = instance.system_metadata.get(
            SECONDARY_CONSUMER) or secondary_consumer(instance.uuid)
        try:
            placement = scheduler_report.report_client_singleton()
            allocs = placement.get_allocs_for_consumer(context, consumer)
            if not allocs.get('allocations'):
                return 'its allocation is gone'
            service = service_obj.Service.get_by_compute_host(
                context, secondary)
            # its compute node provider carries the trait while it can
            # protect (mftvm_openstack.nova.steering)
            capable = any(
                steering.TRAIT in placement.get_provider_traits(
                    context, provider).traits
                for provider in allocs['allocations'])
        except nova_exception.ComputeHostNotFound:
            return 'its host is gone'
        except Exception as exc:
            # a passing fault must not cost a good secondary: keep it (the
            # agent says so if it cannot protect onto it)
            LOG.warning('Cannot check secondary %s, keeping it: %s',
                        secondary, _one_line(exc), instance=instance)
            return None
        if service.disabled:
            return 'its compute service is disabled'
        if not servicegroup_api.API().service_is_up(service):
            return 'its compute service is down'
        if not capable:
            return 'its host can no longer protect'
        return None

    def _degraded(self, instance: Any, reason: str) -> None:
        LOG.warning('No secondary host for this fault-tolerant instance; '
                    'it runs unprotected: %s', reason, instance=instance)
        self._set_status(instance, f'{STATUS_NO_SECONDARY} ({reason})')

    def _set_status(self, instance: Any, status: str) -> None:
        """Record ``status`` in system and server metadata, and save."""
        status = status[:_STATUS_MAX]
        instance.system_metadata[STATUS] = status
        instance.metadata[STATUS] = status
        try:
            instance.save()
        except nova_exception.InstanceNotFound:
            LOG.debug('Instance gone before ft_status %r was saved',
                      status, instance=instance)

    # -- hand-off on failover (see mftvm_openstack.nova.handoff) ---------

    def _ft_check_takeovers(self) -> None:
        """One look at the local agent; hand off what it took over.

        Instances already known to run here (or not to be Nova's FT
        servers) are remembered while the agent lists them, so a steady
        state costs one agent call per tick and no database access.
        """
        host, context = self._ft_host, self._ft_context
        if host is None or context is None:
            return
        listed_at = time.monotonic()
        try:
            entries = self.agent_api.list(context, host)
        except Exception as exc:
            log = LOG.debug if self._ft_list_failing else LOG.warning
            log('Cannot ask the agent on %s for takeovers: %s', host,
                _one_line(exc))
            self._ft_list_failing = True
            self._ft_keep_status(context, None, listed_at)
            return
        self._ft_list_failing = False
        running = handoff.taken_over(entries)
        for uuid_ in list(self._ft_seen):
            if uuid_ not in running:
                del self._ft_seen[uuid_]
        for uuid_ in running:
            if uuid_ not in self._ft_seen:
                self._ft_take_over(context.elevated(), host, uuid_)
                self._ft_noted(uuid_)
        self._ft_vifs_for_standbys(context.elevated(), host,
                                   handoff.standing_by(entries), running)
        self._ft_keep_status(context, entries, listed_at)

    # -- ft_status kept true (see mftvm_openstack.nova.status) ----------

    def _ft_keep_status(self, context: Any, entries: Any,
                        listed_at: float) -> None:
        keeper = self._ft_status_keeper
        if keeper is not None:
            keeper.tick(context.elevated(), entries, listed_at)

    def _ft_noted(self, uuid_: str) -> None:
        """``uuid_``'s record changed after this look's list."""
        keeper = self._ft_status_keeper
        if keeper is not None:
            keeper.noted(uuid_)

    # -- VIFs on the secondary's host ------------------------------------
    # A restored domain gets the primary's interfaces; those os-vif
    # creates outside libvirt (Nova 34's OVS/OVN taps, delegate_create)
    # must exist on this host before the agent restores the guest. So,
    # as live migration's pre_live_migration does on its destination,
    # they are plugged while this host stands by (the port binding stays
    # the primary's: with ML2/OVN, its requested-chassis keeps OVN from
    # claiming the port here), and the hand-off moves the binding.

    def _ft_vifs_for_standbys(self, context: Any, host: str,
                              standby: list[str],
                              running: list[str]) -> None:
        plugged = self._ft_plugged
        for uuid_ in standby:
            if uuid_ not in plugged:
                self._ft_pre_plug(context, host, uuid_)
        for uuid_ in list(plugged):
            if uuid_ in standby:
                continue
            instance, network_info = plugged.pop(uuid_)
            if uuid_ in running:
                continue        # taken over: its VIFs are its own now
            try:
                self.unplug_vifs(  # type: ignore[attr-defined]
                    instance, network_info)
            except Exception as exc:
                LOG.warning('VIFs plugged for a standby not unplugged: %s',
                            _one_line(exc), instance=instance)

    def _ft_pre_plug(self, context: Any, host: str, uuid_: str) -> None:
        try:
            instance = instance_obj.Instance.get_by_uuid(
                context, uuid_,
                expected_attrs=['system_metadata', 'info_cache'])
        except nova_exception.InstanceNotFound:
            return
        if instance.system_metadata.get(SECONDARY_HOST) != host:
            return      # not the secondary Nova chose: not ours to plug
        network_info = instance.get_network_info()
        try:
            self.plug_vifs(instance, network_info)  # type: ignore[attr-defined]
        except Exception as exc:
            LOG.error('Cannot plug the VIFs of the instance this host '
                      'stands by for (retrying): %s', _one_line(exc),
                      instance=instance)
            return
        if not self._ft_stand_by_volumes(context, host, instance):
            return
        self._ft_plugged[uuid_] = (instance, network_info)
        LOG.info('VIFs plugged on %s, which stands by for this instance',
                 host, instance=instance)

    def _ft_stand_by_volumes(self, context: Any, host: str,
                             instance: Any) -> bool:
        """This host's own attachment of each of ``instance``'s volumes,
        made while it stands by (:mod:`~mftvm_openstack.nova.volumes`);
        False, logged, if Cinder could not make one (retried)."""
        if not mftvm_conf.CONF.ft.rbd_volumes:
            return True
        try:
            made = volumes.ServerVolumes(context, instance).stand_by(
                host, self.get_volume_connector(  # type: ignore[attr-defined]
                    instance))
            if made:
                instance.save()
        except Exception as exc:
            LOG.error('Cannot attach the volumes of the instance this host '
                      'stands by for (retrying): %s', _one_line(exc),
                      instance=instance)
            return False
        return True

    def _ft_take_over_volumes(self, context: Any, host: str,
                              instance: Any) -> None:
        """Cinder's attachments of ``instance``'s volumes moved here."""
        if not mftvm_conf.CONF.ft.rbd_volumes:
            return
        try:
            moved = volumes.ServerVolumes(context, instance).take_over(host)
        except Exception as exc:
            # the guest runs here all the same; Nova's stop, start and
            # reboot would not find its volumes
            LOG.error('The volumes of the instance taken over here were '
                      'not moved in Cinder: %s', _one_line(exc),
                      instance=instance)
            return
        if moved:
            LOG.info('Volumes %s attached here in Cinder', ', '.join(moved),
                     instance=instance)

    def _ft_take_over(self, context: Any, host: str, uuid_: str) -> None:
        try:
            instance = instance_obj.Instance.get_by_uuid(
                context, uuid_,
                expected_attrs=['system_metadata', 'metadata', 'flavor'])
        except nova_exception.InstanceNotFound:
            self._ft_seen[uuid_] = 'not a Nova instance'
            return
        if instance.host == host:
            self._ft_seen[uuid_] = 'runs here'
            return
        old_host = instance.host
        sysmeta = instance.system_metadata
        consumer = sysmeta.get(SECONDARY_CONSUMER) or secondary_consumer(
            instance.uuid)
        try:
            migration = handoff.hand_off(
                context, instance, host, network_api=neutron_api.API(),
                reportclient=scheduler_report.report_client_singleton(),
                consumer=consumer)
        except handoff.HandoffError as exc:
            LOG.error('Hand-off to %s failed (retrying): %s', host, exc,
                      instance=instance)
            return
        except Exception:
            LOG.exception('Hand-off to %s failed (retrying)', host,
                          instance=instance)
            return
        if migration is None:
            self._ft_seen[uuid_] = 'nothing to hand off'
            return
        self._ft_seen[uuid_] = 'handed off'
        self._ft_take_over_volumes(context, host, instance)
        # before a new secondary's disk mirror: one block job at a time
        if self._ft_settle(instance):
            self._ft_replica_released(context, host, instance)
        if self.reprotect_after_handoff:
            self._reprotect_after_handoff(context, instance, old_host)

    def _ft_settle(self, instance: Any) -> bool:
        """Move a guest handed off here where LibvirtDriver expects it:
        its disk to ``<instances_path>/<uuid>/disk`` (live, the guest
        running on), its domain persistent (see
        :mod:`~mftvm_openstack.nova.settle`). False, logged, if not: the
        guest runs on its replica then, and Nova's stop, start and hard
        reboot will not find its disk."""
        instance_dir = libvirt_utils.get_instance_path(instance)
        path = os.path.join(instance_dir, 'disk')
        try:
            dom = self._host.get_connection(  # type: ignore[attr-defined]
            ).lookupByUUIDString(instance.uuid)
            os.makedirs(instance_dir, exist_ok=True)
            # its ephemeral, swap and config drive first (into_place
            # makes the domain persistent as it then is)
            others = settle.others_into_place(dom, {
                dev: os.path.join(instance_dir, name)
                for dev, name in self._ft_local_disks(instance).items()
                if name != 'disk'})
            if settle.into_place(dom, path) or others:
                # what Nova's image backend records of a disk it made
                files.write_json_atomic(
                    os.path.join(instance_dir, 'disk.info'),
                    {path: 'qcow2', **others})
            # a start or hard reboot would fetch them from Glance again
            settle.boot_files_into_place(dom, instance_dir)
        except Exception as exc:
            LOG.error('The guest taken over here stays on its replica; '
                      'stop, start and hard reboot will fail: %s',
                      _one_line(exc), instance=instance)
            return False
        LOG.info('The guest taken over here runs on %s, its domain '
                 'persistent', path, instance=instance)
        return True

    def _ft_replica_released(self, context: Any, host: str,
                             instance: Any) -> None:
        """Tell the agent here that the guest it took over runs on
        Nova's disks now: its replica is nobody's disk, and is not to be
        kept when the guest ends here (the agent keeps the replica of a
        guest that ran from it, which may be the only copy, until told
        so, or until Nova's delete)."""
        try:
            self.agent_api.disk_settled(context, host, instance.uuid)
        except Exception as exc:
            LOG.warning('The agent on %s was not told that the guest\'s '
                        'disk is settled (it keeps the replica until the '
                        'server is deleted): %s', host, _one_line(exc),
                        instance=instance)

    @staticmethod
    def _ft_local_disks(instance: Any) -> dict[str, str]:
        """Target dev → Nova's file name (``disk``, ``disk.local``,
        ``disk.eph0``, ``disk.swap``, ``disk.config``) of each local disk
        of ``instance``, as LibvirtDriver lays them out."""
        return settle.local_disk_names(blockinfo.get_disk_info(
            nova_conf.CONF.libvirt.virt_type, instance, instance.image_meta,
            virt_driver.get_block_device_info(instance,
                                              instance.get_bdms())))

    def _reprotect_after_handoff(self, context: Any, instance: Any,
                                 old_host: str) -> None:
        """Choose a new secondary (never ``old_host``) and protect."""
        try:
            request = ft_request.for_instance(instance)
        except ft_request.InvalidFTRequest as exc:
            LOG.warning('Not re-protected: %s', exc, instance=instance)
            return
        if request.enabled:
            self._protect(context, instance, instance.image_meta, request,
                          avoid=(old_host,))

    def _ft_secondary_to_release(self, instance: Any) -> Optional[str]:
        """The secondary host to release on destroy, if any.

        Only for an instance that this host runs: after an evacuation
        (or an FT hand-off) the old host's clean-up must not touch the
        new host's secondary.
        """
        sysmeta = getattr(instance, 'system_metadata', None) or {}
        secondary = sysmeta.get(SECONDARY_HOST)
        if not secondary:
            return None
        if self._ft_host is not None and instance.host != self._ft_host:
            LOG.info('Not releasing secondary %s: the instance now runs '
                     'on %s', secondary, instance.host, instance=instance)
            return None
        return str(secondary)

    def _ft_agent_may_hold(self, instance: Any) -> bool:
        """Handed off to this host, whatever its ``ft_status`` says now
        (``failed-over from ...`` lasts only until the next change: a
        failed re-protection, a stop): the agent here may run it, or keep
        the replica it ran from."""
        sysmeta = getattr(instance, 'system_metadata', None) or {}
        handed_off = bool(sysmeta.get(handoff.HANDED_OFF_FROM)) or str(
            sysmeta.get(STATUS) or '').startswith(handoff.FAILED_OVER)
        return (handed_off and self._ft_host is not None and
                instance.host == self._ft_host)

    def _stop_agents(self, context: Any, instance: Any,
                     secondary: Optional[str]) -> None:
        for host in (instance.host, secondary):
            if host is None:
                continue
            try:
                self.agent_api.stop_instance(context, host, instance.uuid)
            except agent_exception.InstanceNotFound:
                # nothing of it there (never protected, or gone already)
                LOG.debug('The agent on %s has nothing of the instance',
                          host, instance=instance)
            except Exception as exc:
                LOG.warning('The agent on %s did not stop the instance: %s',
                            host, _one_line(exc), instance=instance)

    def _release_secondary(self, context: Any, instance: Any,
                           status: Optional[str] = STATUS_STOPPED) -> bool:
        """Delete the secondary's allocation and forget it.

        ``status`` (None: left as is) is recorded once done. False if
        Placement refused (recorded in ``ft_status``).
        """
        sysmeta = instance.system_metadata
        consumer = sysmeta.get(SECONDARY_CONSUMER) or secondary_consumer(
            instance.uuid)
        try:
            scheduler_report.report_client_singleton(
            ).delete_allocation_for_instance(context, consumer, force=True)
        except Exception as exc:
            LOG.error('Could not delete the secondary\'s allocation '
                      '(consumer %s): %s', consumer, _one_line(exc),
                      instance=instance)
            self._set_status(instance, 'error: secondary allocation not '
                                       f'deleted: {_one_line(exc)}')
            return False
        for key in (SECONDARY_HOST, SECONDARY_NODE, SECONDARY_CONSUMER):
            sysmeta.pop(key, None)
        # the secondary's own attachments of the volumes, if it made any
        volumes.ServerVolumes(context, instance).abandon()
        if status is not None:
            self._set_status(instance, status)
        else:
            instance.save()
        return True


class FTLibvirtDriver(FTDriverMixin, libvirt_driver.LibvirtDriver):
    """``LibvirtDriver`` with fault tolerance for FT servers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # [ft] nic_checksum_offload, read at each use (nic_checksum.py)
        self.vif_driver = nic_checksum.ChecksumOffVIFDriver(
            self.vif_driver,  # type: ignore[has-type]
            lambda: not mftvm_conf.CONF.ft.nic_checksum_offload)
