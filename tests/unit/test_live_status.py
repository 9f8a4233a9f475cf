"""What Nova's driver records of an FT server, from its agent's status."""

import doctest
import unittest

from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import (
    UNPROTECTED_BY_REQUEST,
    InstanceStatus,
)
from mftvm_openstack.nova import live_status
from mftvm_openstack.nova.live_status import Verdict, judge


def primary(state: State, **kw) -> InstanceStatus:
    kw.setdefault('alive', True)
    return InstanceStatus(role=Role.PRIMARY, state=state, **kw)


class TestJudge(unittest.TestCase):

    def test_doctests(self):
        result = doctest.testmod(live_status)
        self.assertGreater(result.attempted, 0)
        self.assertEqual(0, result.failed)

    def test_secondary_lost_released_and_reprotected(self):
        live = primary(State.UNPROTECTED, reason='no ack', peer='hv2')
        self.assertEqual(
            Verdict('unprotected: secondary hv2 lost (no ack)', 'hv2',
                    True), judge('protected', 'hv2', live))

    def test_failed_protection_counts_as_lost(self):
        # Nova holds hv3, the agent's protection onto it failed
        live = primary(State.UNPROTECTED, error='protection failed: x')
        self.assertEqual(
            Verdict('unprotected: secondary hv3 lost (protection failed: '
                    'x)', 'hv3', True),
            judge('error: protect failed: x', 'hv3', live))

    def test_secondary_never_taken_up_released_status_kept(self):
        # Nova chose hv3, the agent's protect failed before it got there:
        # its reason is hv2's, the driver's status says what failed
        live = primary(State.UNPROTECTED, reason='no ack', peer='hv2')
        self.assertEqual(Verdict(release='hv3', reprotect=True),
                         judge('error: protect failed: x', 'hv3', live))

    def test_taken_over_guest_without_secondary_reprotected(self):
        live = primary(State.ACTIVE)
        self.assertEqual(Verdict(reprotect=True),
                         judge('failed-over from hv1; unprotected', None,
                               live))

    def test_unprotected_by_request_left_alone(self):
        live = primary(State.UNPROTECTED, reason=UNPROTECTED_BY_REQUEST)
        self.assertEqual(Verdict(),
                         judge('unprotected: rebooting', 'hv2', live))

    def test_protected_recorded(self):
        live = primary(State.PROTECTED, last_committed_epoch=1, peer='hv2')
        self.assertEqual(Verdict(status='protected'),
                         judge('protecting', 'hv2', live))
        self.assertEqual(Verdict(), judge('protected', 'hv2', live))

    def test_protected_before_a_commit_is_not_yet(self):
        live = primary(State.PROTECTED, last_committed_epoch=0, peer='hv2')
        self.assertEqual(Verdict(), judge('protecting', 'hv2', live))

    def test_agent_chose_another_peer_releases_novas(self):
        live = primary(State.PROTECTED, last_committed_epoch=4, peer='hv4')
        self.assertEqual(
            Verdict('protected onto hv4, not held in Placement', 'hv2'),
            judge('protected', 'hv2', live))
        # and once released, said, and said only once
        self.assertEqual(
            Verdict('protected onto hv4, not held in Placement'),
            judge('unprotected: secondary hv2 lost (x)', None, live))
        self.assertEqual(Verdict(), judge(
            'protected onto hv4, not held in Placement', None, live))

    def test_nothing_judged_without_a_live_primary(self):
        for live in (None,
                     primary(State.UNPROTECTED, alive=False),
                     InstanceStatus(role=Role.SECONDARY,
                                    state=State.STANDBY),
                     primary(State.SYNCING, peer='hv2'),
                     primary(State.STOPPED)):
            self.assertEqual(Verdict(), judge('protected', 'hv2', live),
                             live)


if __name__ == '__main__':
    unittest.main()
