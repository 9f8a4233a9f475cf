"""Choosing the secondary among Placement's offers, and which hosts can
protect (no Nova)."""

from __future__ import annotations

import doctest
from typing import Any

import testtools

from mftvm_openstack.nova import secondary_choice, steering
from mftvm_openstack.nova.secondary_choice import (
    MAX_CLAIMS,
    Candidate,
    Chosen,
    Located,
    NoSecondary,
    choose,
    claim_body,
    rank,
)

ASKED = {'VCPU': 1, 'MEMORY_MB': 512, 'DISK_GB': 1}


def summary(root: str | None = None, vcpu_used: int = 0,
            memory_used: int = 0) -> dict[str, Any]:
    return {'root_provider_uuid': root, 'resources': {
        'VCPU': {'capacity': 16, 'used': vcpu_used},
        'MEMORY_MB': {'capacity': 8192, 'used': memory_used},
        'DISK_GB': {'capacity': 100, 'used': 0}}}


def offer(*providers: str) -> dict[str, Any]:
    return {'allocations': {rp: {'resources': dict(ASKED)}
                            for rp in providers},
            'mappings': {'': list(providers)}}


class TestDocstrings(testtools.TestCase):

    def test_doctests(self) -> None:
        for module in (secondary_choice, steering):
            result = doctest.testmod(module)
            self.assertGreater(result.attempted, 0, module.__name__)
            self.assertEqual(0, result.failed, module.__name__)


class TestRank(testtools.TestCase):

    def test_least_used_first(self) -> None:
        summaries = {'a': summary('a', vcpu_used=8),
                     'b': summary('b', memory_used=6144),
                     'c': summary('c', vcpu_used=2)}
        ranked = rank([offer('a'), offer('b'), offer('c')], summaries)
        # c: 3/16 VCPU; a: 9/16 VCPU; b: 6656/8192 memory
        self.assertEqual(['c', 'a', 'b'], [c.provider for c in ranked])
        self.assertEqual([3 / 16, 9 / 16, 6656 / 8192],
                         [c.use for c in ranked])

    def test_ties_by_provider_whatever_the_order(self) -> None:
        summaries = {rp: summary(rp) for rp in 'zyx'}
        for order in ('zyx', 'xzy', 'yxz'):
            ranked = rank([offer(rp) for rp in order], summaries)
            self.assertEqual(['x', 'y', 'z'], [c.provider for c in ranked])

    def test_one_candidate_per_host_the_first_offer(self) -> None:
        summaries = {'a': summary('a'), 'b': summary('b')}
        first, second = offer('a'), offer('a')
        second['allocations']['a']['resources']['VCPU'] = 2
        ranked = rank([first, second, offer('b')], summaries)
        self.assertEqual(['a', 'b'], [c.provider for c in ranked])
        self.assertIs(first, ranked[0].request)

    def test_nested_and_sharing_providers_map_to_the_compute_node(
            self) -> None:
        summaries = {'cn': summary('cn'), 'numa0': summary('cn'),
                     'shared': summary('shared')}
        request = {'allocations': {
            'numa0': {'resources': {'VCPU': 1, 'MEMORY_MB': 512}},
            'shared': {'resources': {'DISK_GB': 1}}}}
        (candidate,) = rank([request], summaries)
        self.assertEqual('cn', candidate.provider)

    def test_empty_and_missing_summaries(self) -> None:
        self.assertEqual([], rank([], {}))
        self.assertEqual([], rank([{'allocations': {}}], {}))
        (candidate,) = rank([offer('a')], {})
        self.assertEqual(('a', 0.0), (candidate.provider, candidate.use))


def candidates(*providers: str) -> list[Candidate]:
    return [Candidate(rp, offer(rp), 0.0) for rp in providers]


class TestChoose(testtools.TestCase):

    def setUp(self) -> None:
        super().setUp()
        self.claimed: list[str] = []
        self.refuse: set[str] = set()
        self.hosts: dict[str, Any] = {
            rp: Located(f'hv-{rp}', f'node-{rp}') for rp in 'abcdef'}

    def claim(self, candidate: Candidate) -> bool:
        self.claimed.append(candidate.provider)
        return candidate.provider not in self.refuse

    def choose(self, *providers: str, exclude: tuple[str, ...] = (),
               **kwargs: Any) -> Chosen:
        return choose(candidates(*providers), self.hosts.get, self.claim,
                      exclude=exclude, **kwargs)

    def test_first_that_can_serve(self) -> None:
        self.assertEqual(Chosen('hv-a', 'node-a', 'a', 1),
                         self.choose('a', 'b'))
        self.assertEqual(['a'], self.claimed)

    def test_excluded_hosts_never_claimed(self) -> None:
        chosen = self.choose('a', 'b', 'c', exclude=('hv-a', 'hv-b'))
        self.assertEqual('hv-c', chosen.host)
        self.assertEqual(['c'], self.claimed)

    def test_refused_claim_moves_to_the_next(self) -> None:
        self.refuse = {'a', 'b'}
        chosen = self.choose('a', 'b', 'c')
        self.assertEqual(Chosen('hv-c', 'node-c', 'c', 3), chosen)
        self.assertEqual(['a', 'b', 'c'], self.claimed)

    def test_claims_are_bounded(self) -> None:
        self.refuse = set('abcdef')
        error = self.assertRaises(NoSecondary, self.choose, *'abcdef')
        self.assertEqual(list('abcdef'[:MAX_CLAIMS]), self.claimed)
        self.assertEqual('no FT-capable host could be claimed (claims '
                         'refused (taken meanwhile): hv-a, hv-b, hv-c)',
                         str(error))
        self.claimed.clear()
        self.assertRaises(NoSecondary, self.choose, *'abcdef',
                          max_claims=1)
        self.assertEqual(['a'], self.claimed)

    def test_unfit_hosts_skipped_without_a_claim(self) -> None:
        self.hosts['a'] = 'hv-a: its compute service is down'
        self.hosts['b'] = None
        chosen = self.choose('a', 'b', 'c')
        self.assertEqual('hv-c', chosen.host)
        self.assertEqual(['c'], self.claimed)

    def test_why_none(self) -> None:
        cases = [
            ((), (), 'no other FT-capable host has room'),
            (('a',), ('hv-a',), 'no other FT-capable host has room'),
        ]
        for providers, exclude, why in cases:
            error = self.assertRaises(NoSecondary, self.choose, *providers,
                                      exclude=exclude)
            self.assertEqual(why, str(error))
        self.hosts['a'] = 'hv-a: its compute service is disabled'
        self.hosts['b'] = None
        self.refuse = {'c'}
        error = self.assertRaises(NoSecondary, self.choose, 'a', 'b', 'c',
                                  'd', exclude=('hv-d',))
        self.assertEqual(
            'no FT-capable host could be claimed (claims refused (taken '
            'meanwhile): hv-c; unfit: hv-a: its compute service is '
            'disabled; provider b: not a compute node of this cell; '
            'excluded: hv-d)', str(error))


class TestClaimBody(testtools.TestCase):

    def test_only_allocations_for_a_new_consumer(self) -> None:
        candidate = Candidate('a', offer('a', 'shared'), 0.0)
        body = claim_body(candidate, 'project', 'user')
        self.assertEqual(
            {'allocations': {'a': {'resources': ASKED},
                             'shared': {'resources': ASKED}},
             'project_id': 'project', 'user_id': 'user',
             'consumer_generation': None}, body)
        # a copy: the offer stays as Placement gave it
        body['allocations']['a']['resources']['VCPU'] = 9
        self.assertEqual(1, candidate.request['allocations']['a']
                         ['resources']['VCPU'])


class TestSteering(testtools.TestCase):

    def test_capable_needs_memory_file_and_agent(self) -> None:
        self.assertIsNone(steering.why_not_capable(1, True))
        self.assertIn('file_backed_memory',
                      steering.why_not_capable(0, True) or '')
        self.assertIn('file_backed_memory',
                      steering.why_not_capable(0, False) or '')
        self.assertIn('does not answer',
                      steering.why_not_capable(4096, False) or '')

    def test_flavor_spec_names_the_trait(self) -> None:
        self.assertEqual('trait:CUSTOM_MFTVM_FT',
                         steering.FLAVOR_TRAIT_SPEC)
        self.assertTrue(steering.TRAIT.startswith('CUSTOM_'))
