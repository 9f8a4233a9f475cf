"""The manager's choice of peers (no agents, no QEMU)."""

from __future__ import annotations

import unittest

from oslo_config import cfg

from mftvm_openstack import conf
from mftvm_openstack.agent import manager


class CandidatesTest(unittest.TestCase):

    def make(self, host: str, peers: list[str]) -> manager.AgentManager:
        c = cfg.ConfigOpts()
        conf.register_opts(c)
        c([], project='mftvm-test')
        c.set_override('host', host, group='agent')
        c.set_override('peers', peers, group='agent')
        c.set_override('state_path', '/nonexistent', group='agent')
        return manager.AgentManager(c, agents=object())

    def test_self_is_never_a_candidate_and_order_is_kept(self):
        m = self.make('h2', ['h1', 'h2', 'h3'])
        self.assertEqual(['h1', 'h3'], m._candidates(None, ()))

    def test_preferred_first(self):
        m = self.make('h1', ['h2', 'h3'])
        self.assertEqual(['h3', 'h2'], m._candidates('h3', ()))

    def test_the_lost_peer_is_asked_last_not_never(self):
        # It may be the only peer left once another one failed too.
        m = self.make('h1', ['h2', 'h3'])
        self.assertEqual(['h3', 'h2'], m._candidates(None, ('h2',)))
        self.assertEqual(['h3'], self.make('h1', ['h3'])._candidates(
            None, ('h3',)))
