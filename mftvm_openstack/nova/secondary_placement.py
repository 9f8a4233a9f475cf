"""Choose and hold an FT server's secondary through Placement, from
nova-compute, with no call to nova-scheduler.

Under cells v2's superconductor topology (DevStack's default) a compute
cannot reach nova-scheduler, but every compute talks to Placement with
Nova's report client. So the driver does here what the scheduler would
have done for the secondary::

    chosen = secondary_placement.select(
        context, instance, image_meta,
        consumer=driver.secondary_consumer(instance.uuid),
        exclude={'hv1'})                 # the primary, hosts to avoid
    chosen.host, chosen.node            # ('hv2', 'hv2')
    # Placement now holds the flavor's resources on hv2 for `consumer`

1. **Ask.** ``GET /allocation_candidates`` with the question
   nova-scheduler would put for the server (Nova's own
   ``ResourceRequest.from_request_spec`` on a ``RequestSpec`` built from
   the instance: the flavor's resources, its ``resources:`` and
   ``trait:`` extra specs, the image's required traits, CPU pinning),
   plus, on the compute node (root provider), the trait
   :data:`~mftvm_openstack.nova.steering.TRAIT` required, and what the
   scheduler adds to every query: ``OWNER_NOVA`` required,
   ``COMPUTE_STATUS_DISABLED`` forbidden.
2. **Choose.** :func:`~mftvm_openstack.nova.secondary_choice.rank` puts
   the least used host first; each candidate's provider is mapped to its
   compute node (``ComputeNode.get_by_uuid``: its ``host`` and
   ``hypervisor_hostname``), skipped if its host is excluded or its
   compute service is down or disabled.
3. **Claim.** ``PUT /allocations/<consumer>`` with that candidate's
   allocation request (the report client's ``put_allocations``,
   ``consumer_generation`` None: only a consumer that holds nothing). A
   409 (another claim took the room since the candidates were listed)
   moves to the next candidate, at most
   :data:`~mftvm_openstack.nova.secondary_choice.MAX_CLAIMS` times.

Anything that fails raises
:class:`~mftvm_openstack.nova.secondary_choice.NoSecondary` with a
reason for ``ft_status``. What the scheduler would also have weighed and
this does not: server groups, availability zones and aggregates (unless
mapped to Placement), the host filters that run after Placement (NUMA
topology, PCI devices) and port resource requests (QoS).
"""

from __future__ import annotations

from typing import Any, Optional, Union

import nova.exception as nova_exception
import nova.objects.compute_node as compute_node_obj
import nova.objects.request_spec as request_spec_obj
import nova.objects.service as service_obj
import os_traits
from nova.compute import utils as compute_utils
from nova.scheduler import utils as scheduler_utils
from nova.scheduler.client import report as scheduler_report
from nova.servicegroup import api as servicegroup_api

from mftvm_openstack.nova import secondary_choice, steering
from mftvm_openstack.nova.secondary_choice import (
    Candidate,
    Chosen,
    Located,
    NoSecondary,
)


def resource_request(context: Any, instance: Any,
                     image_meta: Any) -> Any:
    """The ``ResourceRequest`` for a secondary of ``instance``."""
    params = request_spec_obj.RequestLevelParams(
        root_required={steering.TRAIT, os_traits.OWNER_NOVA},
        root_forbidden={os_traits.COMPUTE_STATUS_DISABLED})
    spec = request_spec_obj.RequestSpec.from_components(
        context, instance.uuid, image_meta, instance.flavor,
        instance.numa_topology, instance.pci_requests, {}, None,
        instance.availability_zone, project_id=instance.project_id,
        user_id=instance.user_id, request_level_params=params)
    spec.is_bfv = compute_utils.is_volume_backed_instance(context, instance)
    return scheduler_utils.ResourceRequest.from_request_spec(spec)


def locate(context: Any, provider: str) -> Union[Located, str, None]:
    """The compute host and node of ``provider``, or why it cannot serve
    (None: no compute node of this cell has that uuid)."""
    try:
        node = compute_node_obj.ComputeNode.get_by_uuid(context, provider)
    except nova_exception.ComputeHostNotFound:
        return None
    try:
        service = service_obj.Service.get_by_compute_host(context,
                                                          node.host)
    except nova_exception.ComputeHostNotFound:
        return f'{node.host}: its compute service is gone'
    if service.disabled:
        return f'{node.host}: its compute service is disabled'
    if not servicegroup_api.API().service_is_up(service):
        return f'{node.host}: its compute service is down'
    return Located(host=node.host, node=node.hypervisor_hostname)


def select(context: Any, instance: Any, image_meta: Any, consumer: str,
           exclude: frozenset[str],
           reportclient: Optional[Any] = None) -> Chosen:
    """Choose a secondary host for ``instance`` and hold it for
    ``consumer`` (see the module).

    :raises NoSecondary: no host could be claimed; its message says why.
    """
    client = reportclient or scheduler_report.report_client_singleton()
    answer = client.get_allocation_candidates(
        context, resource_request(context, instance, image_meta))
    if not answer or answer[0] is None:
        # the report client logged Placement's answer
        raise NoSecondary('Placement gave no allocation candidates (its '
                          'answer is in this nova-compute\'s log)')
    allocation_requests, provider_summaries, _version = answer

    def claim(candidate: Candidate) -> bool:
        body = secondary_choice.claim_body(
            candidate, instance.project_id, instance.user_id)
        try:
            return bool(client.put_allocations(context, consumer, body))
        except nova_exception.AllocationUpdateFailed:
            # not a race for the host: the consumer holds an allocation
            # already, which only its release may drop
            raise NoSecondary(
                f'its Placement consumer {consumer} already holds an '
                'allocation') from None

    return secondary_choice.choose(
        secondary_choice.rank(allocation_requests, provider_summaries),
        lambda provider: locate(context, provider), claim, exclude)
