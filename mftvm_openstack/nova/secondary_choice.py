"""Which host an FT server's secondary goes to, among Placement's offers.

nova-compute chooses the secondary itself: it cannot call nova-scheduler
under cells v2's superconductor topology, but it talks to Placement. It
asks ``GET /allocation_candidates`` for the server's resources on an
FT-capable host (see :mod:`~mftvm_openstack.nova.secondary_placement`,
which asks), and this module decides among the answers::

    >>> summaries = {
    ...     'rp-a': {'root_provider_uuid': 'rp-a', 'resources': {
    ...         'VCPU': {'capacity': 8, 'used': 6},
    ...         'MEMORY_MB': {'capacity': 8192, 'used': 1024}}},
    ...     'rp-b': {'root_provider_uuid': 'rp-b', 'resources': {
    ...         'VCPU': {'capacity': 8, 'used': 1},
    ...         'MEMORY_MB': {'capacity': 8192, 'used': 2048}}}}
    >>> asked = {'resources': {'VCPU': 1, 'MEMORY_MB': 512}}
    >>> offers = [{'allocations': {'rp-a': asked}},
    ...           {'allocations': {'rp-b': asked}}]
    >>> [(c.provider, c.use) for c in rank(offers, summaries)]
    [('rp-b', 0.3125), ('rp-a', 0.875)]

``rank`` spreads: the host whose fullest resource would be the least
full comes first (rp-a would be 7/8 full of VCPU), ties broken by
provider uuid, so the same offers always give the same order.
:func:`choose` then walks that order: it skips a candidate whose host
is excluded (the primary's, the failed host's) or cannot serve, and
claims the first other one; a claim refused (Placement's 409: another
claim took the room since the offers were made) moves on to the next,
at most :data:`MAX_CLAIMS` times::

    >>> hosts = {'rp-a': Located('hv1', 'hv1'),
    ...          'rp-b': Located('hv2', 'hv2')}
    >>> refused = {'rp-b'}                  # taken meanwhile
    >>> choose(rank(offers, summaries), hosts.get,
    ...        lambda c: c.provider not in refused, exclude={'hv3'})
    Chosen(host='hv1', node='hv1', provider='rp-a', tried=2)
    >>> try:
    ...     choose(rank(offers, summaries), hosts.get,
    ...            lambda c: True, exclude={'hv1', 'hv2'})
    ... except NoSecondary as exc:
    ...     print(exc)
    no other FT-capable host has room

Nothing here knows Nova: the offers are Placement's JSON, ``locate`` and
``claim`` are callables (:mod:`.secondary_placement` gives Nova's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Optional, Union

#: claims tried before giving up: each refusal means another claim won a
#: race for that host, and offers that old are likely stale
MAX_CLAIMS = 3

#: resource classes that belong to the compute node itself (a sharing
#: provider, e.g. of DISK_GB, is another root)
_HOST_CLASSES = ('VCPU', 'PCPU', 'MEMORY_MB')


class NoSecondary(Exception):
    """No host can be the secondary; ``str()`` says why, for people."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One of Placement's offers.

    ``provider`` is the compute node's (root) provider, ``request`` the
    allocation request to ``PUT`` to claim it, ``use`` how full its
    fullest asked-for resource would be (0 to 1).
    """

    provider: str
    request: Mapping[str, Any]
    use: float


@dataclasses.dataclass(frozen=True)
class Located:
    """The compute host and node (hypervisor hostname) of a provider."""

    host: str
    node: str


@dataclasses.dataclass(frozen=True)
class Chosen:
    """The claimed secondary; ``tried`` claims it took (1: the first)."""

    host: str
    node: str
    provider: str
    tried: int


def _host_provider(allocations: Mapping[str, Any],
                   summaries: Mapping[str, Any]) -> str:
    """The root provider of the compute node an offer allocates on."""
    def root(rp: str) -> str:
        summary = summaries.get(rp) or {}
        return str(summary.get('root_provider_uuid') or rp)

    for rp in sorted(allocations):
        resources = (allocations[rp] or {}).get('resources') or {}
        if any(rc in resources for rc in _HOST_CLASSES):
            return root(rp)
    return root(sorted(allocations)[0])


def _use(allocations: Mapping[str, Any],
         summaries: Mapping[str, Any]) -> float:
    """How full the fullest resource the offer takes would be."""
    fullest = 0.0
    for rp, allocation in allocations.items():
        have = (summaries.get(rp) or {}).get('resources') or {}
        asked = (allocation or {}).get('resources') or {}
        for rc, amount in asked.items():
            capacity = (have.get(rc) or {}).get('capacity') or 0
            used = (have.get(rc) or {}).get('used') or 0
            if capacity > 0:
                fullest = max(fullest, (used + amount) / capacity)
    return fullest


def rank(allocation_requests: Iterable[Mapping[str, Any]],
         provider_summaries: Mapping[str, Any]) -> list[Candidate]:
    """Placement's offers, least used host first (see the module).

    One candidate per compute node: the first offer for each (Placement
    may offer one host several ways, e.g. with a sharing provider).
    """
    best: dict[str, Candidate] = {}
    for request in allocation_requests:
        allocations = request.get('allocations') or {}
        if not allocations:
            continue
        provider = _host_provider(allocations, provider_summaries)
        if provider in best:
            continue
        best[provider] = Candidate(
            provider=provider, request=request,
            use=_use(allocations, provider_summaries))
    return sorted(best.values(), key=lambda c: (c.use, c.provider))


def choose(candidates: Iterable[Candidate],
           locate: Callable[[str], Union[Located, str, None]],
           claim: Callable[[Candidate], bool],
           exclude: Collection[str] = (),
           max_claims: int = MAX_CLAIMS) -> Chosen:
    """Claim the first candidate that can serve, in order.

    :param locate: a provider's :class:`Located` host, or why it cannot
        serve (a string, e.g. 'its compute service is down'; None: not
        a compute node this host knows).
    :param claim: writes the candidate's allocation for the secondary's
        consumer; False when Placement refused it (409).
    :param exclude: hosts never chosen (the primary's, hosts to avoid).
    :raises NoSecondary: none could be claimed; the message says why.
    """
    offered = 0
    excluded: list[str] = []
    unfit: list[str] = []
    refused: list[str] = []
    for candidate in candidates:
        offered += 1
        where = locate(candidate.provider)
        if not isinstance(where, Located):
            unfit.append(where or f'provider {candidate.provider}: not a '
                                  'compute node of this cell')
            continue
        if where.host in exclude:
            excluded.append(where.host)
            continue
        if len(refused) >= max_claims:
            break
        if claim(candidate):
            return Chosen(host=where.host, node=where.node,
                          provider=candidate.provider,
                          tried=len(refused) + 1)
        refused.append(where.host)
    raise NoSecondary(_why_none(offered, excluded, unfit, refused))


def _why_none(offered: int, excluded: list[str], unfit: list[str],
              refused: list[str]) -> str:
    if not offered:
        return 'no other FT-capable host has room'
    parts: list[str] = []
    if refused:
        parts.append('claims refused (taken meanwhile): '
                     + ', '.join(refused))
    if unfit:
        parts.append('unfit: ' + '; '.join(unfit))
    if not parts:       # all excluded: the primary's, the avoided
        return 'no other FT-capable host has room'
    if excluded:
        parts.append('excluded: ' + ', '.join(sorted(set(excluded))))
    return f'no FT-capable host could be claimed ({"; ".join(parts)})'


def claim_body(candidate: Candidate, project_id: str,
               user_id: str) -> dict[str, Any]:
    """The ``PUT /allocations/{consumer}`` body (microversion 1.28) that
    claims ``candidate`` for a consumer that holds nothing yet.

    ``consumer_generation`` None: Placement refuses it (409) if the
    consumer already holds an allocation, so a claim never adds to a
    leftover one::

        >>> claim_body(Candidate('rp-b', {'allocations': {'rp-b': {
        ...     'resources': {'VCPU': 1}}}, 'mappings': {}}, 0.1), 'p', 'u')
        ... # doctest: +NORMALIZE_WHITESPACE
        {'allocations': {'rp-b': {'resources': {'VCPU': 1}}},
         'project_id': 'p', 'user_id': 'u', 'consumer_generation': None}
    """
    allocations = {
        rp: {'resources': dict((a or {}).get('resources') or {})}
        for rp, a in (candidate.request.get('allocations') or {}).items()}
    return {'allocations': allocations, 'project_id': project_id,
            'user_id': user_id, 'consumer_generation': None}


def excluded_hosts(primary: Optional[str],
                   avoid: Iterable[Optional[str]]) -> frozenset[str]:
    """The hosts a secondary may not be on: the primary's and ``avoid``.

        >>> sorted(excluded_hosts('hv1', ('hv2', None)))
        ['hv1', 'hv2']
    """
    return frozenset(h for h in (primary, *avoid) if h)
