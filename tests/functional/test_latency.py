"""What a client of a protected guest waits for, counted in checkpoints
rather than timed.

A request on a new connection must wait for two commits: the guest's
SYN-ACK leaves with one, its answer with the next. Between them the
guest acknowledges the request at once and answers only once it has
written its disk; an epoch that ended at the acknowledgement would pause
the guest in mid-answer and leave the answer for a third commit."""

import statistics
import time

from mftvm_openstack.contract.control import ControlOp, ControlRequest
from mftvm_openstack.contract.states import State
from mftvm_openstack.images import workload
from mftvm_openstack.instance import client
from tests.functional import base


class CommitsPerRequestTest(base.GuestTestCase):

    REQUESTS = 30

    def epochs(self, gdir):
        """The checkpoints the primary has taken (asked live)."""
        reply = client.control(gdir, 'primary',
                               ControlRequest(op=ControlOp.STATUS), 10)
        assert reply.status is not None
        return reply.status.epochs

    def test_a_request_spans_two_checkpoints_not_three(self):
        # Only the counter runs (nothing else sends), and the defaults'
        # adaptive epochs.
        spec, gdir = self.protect('cr', run='counter')
        last = self.wait_counter(gdir)
        self.assertEqual(State.PROTECTED, self.side('cr', 'primary')['state'])
        spans = []
        for _ in range(self.REQUESTS):
            # (a pause between requests: the last one's closing segments
            # are committed before the next is asked)
            time.sleep(0.3)
            before = self.epochs(gdir)
            got = workload.counter_request('127.0.0.1', self.port, 5)
            spans.append(self.epochs(gdir) - before)
            self.assertEqual(last + 1, got)
            last = got
        print(f'checkpoints per request: {sorted(spans)}')
        self.assertEqual(2, statistics.median(spans), sorted(spans))
