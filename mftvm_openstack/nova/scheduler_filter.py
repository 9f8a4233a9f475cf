"""A nova-scheduler filter: servers of FT flavors only on FT-capable hosts.

The steering itself is the flavor's ``trait:CUSTOM_MFTVM_FT=required``
(see :mod:`~mftvm_openstack.nova.steering`): Placement then offers FT
hosts only, at no cost. This filter is the safety net for an FT flavor
(``ft:enabled=true``) that lacks it. Enable it in nova-scheduler's
nova.conf, with this package installed next to it::

    [filter_scheduler]
    available_filters = nova.scheduler.filters.all_filters
    available_filters = mftvm_openstack.nova.scheduler_filter.FTHostFilter
    enabled_filters = ComputeFilter,ComputeCapabilitiesFilter,\\
        ImagePropertiesFilter,ServerGroupAntiAffinityFilter,\\
        ServerGroupAffinityFilter,FTHostFilter

Then, for each request::

    flavor does not ask for FT              -> every host passes
    flavor requires trait:CUSTOM_MFTVM_FT   -> every host passes (Placement
                                               offered FT hosts only)
    otherwise                               -> a host passes if Placement
                                               lists the trait on its
                                               compute node (one GET each)

A flavor whose ``ft:enabled`` cannot be read counts as asking (its build
fails on the compute anyway). A host whose traits Placement does not
give is left out. Server metadata (``ft=true``) is not in the request
the scheduler sees: such servers are not filtered (the compute says in
``ft_status`` when it cannot protect them).
"""

from __future__ import annotations

from typing import Any

import nova.context as nova_context
from nova.scheduler import filters
from nova.scheduler.client import report as scheduler_report
from oslo_log import log as logging

from mftvm_openstack.nova import ft_request, steering

LOG = logging.getLogger(__name__)


def flavor_asks_ft(extra_specs: Any) -> bool:
    """The flavor's ``ft:enabled`` is true (or unreadable)::

        >>> flavor_asks_ft({'ft:enabled': 'yes'}), flavor_asks_ft({})
        (True, False)
        >>> flavor_asks_ft({'ft:enabled': 'maybe'})
        True
    """
    value = (extra_specs or {}).get(ft_request.ENABLED)
    if value is None:
        return False
    try:
        return ft_request.parse_bool(ft_request.FLAVOR, ft_request.ENABLED,
                                     value)
    except ft_request.InvalidFTRequest:
        return True


def flavor_requires_trait(extra_specs: Any) -> bool:
    """Placement already keeps the flavor's servers on FT hosts::

        >>> flavor_requires_trait({'trait:CUSTOM_MFTVM_FT': 'required'})
        True
    """
    value = (extra_specs or {}).get(steering.FLAVOR_TRAIT_SPEC)
    return str(value or '').strip() == 'required'


class FTHostFilter(filters.BaseHostFilter):
    """Pass only FT-capable hosts for FT flavors (see the module)."""

    # a host's traits do not change within one request's filtering, but
    # the hosts do: run for each
    run_filter_once_per_request = False
    RUN_ON_REBUILD = False

    def host_passes(self, host_state: Any, spec_obj: Any) -> bool:
        flavor = getattr(spec_obj, 'flavor', None)
        extra_specs = getattr(flavor, 'extra_specs', None) or {}
        if not flavor_asks_ft(extra_specs):
            return True
        if flavor_requires_trait(extra_specs):
            return True
        LOG.debug('Flavor %s asks for FT without %s=required: asking '
                  'Placement for the traits of host %s',
                  getattr(flavor, 'name', '?'), steering.FLAVOR_TRAIT_SPEC,
                  host_state.host)
        try:
            traits = scheduler_report.report_client_singleton(
            ).get_provider_traits(nova_context.get_admin_context(),
                                  host_state.uuid).traits
        except Exception as exc:
            LOG.warning('Host %s left out of an FT request: Placement did '
                        'not give its traits (%s)', host_state.host, exc)
            return False
        return steering.TRAIT in traits
