"""The partition suite: agents fencing on a 3-member etcd cluster while
the network splits.

Three hosts run an agent each (``h1`` primary, ``h2`` its secondary,
``h3`` spare); the etcd members are hosts of their own (``e1``..``e3``).
Each test splits the network one way and proves, whatever the split,
one running copy of the guest at every moment (sampled every 20 ms across
all namespaces) and its counter never taken back (every answer is the
last + 1):

* an etcd member (the leader) partitioned away: nothing changes for the
  guest, and a host dying meanwhile still fails over;
* the primary and its secondary cut apart, both still reaching etcd: the
  primary keeps its lease and runs on, the secondary never resumes;
* the primary cut off from every etcd member but not from its secondary:
  the secondary's word keeps it running, protected, and once its host
  dies the secondary takes over.

``tools/partition_soak.py`` runs each test many times over (CI runs each
once).
"""

from __future__ import annotations

import time

from mftvm_openstack.local import demo
from tests.functional import base
from tests.integration.test_agent_failover import (
    ETCD_MEMBERS,
    AgentLab,
    CopyCounter,
)

LEASE = 3


class EtcdPartitions(AgentLab):

    backend = 'etcd'

    def watch_copies(self) -> CopyCounter:
        copies = CopyCounter(self.qemu_pids)
        self.addCleanup(copies.stop)
        return copies

    def test_an_etcd_member_partitioned_away(self):
        port = demo.free_port()
        last = self.protect(port)
        copies = self.watch_copies()
        leader = self.etcd.leader()
        self.assertIn(leader, ETCD_MEMBERS)
        self.lab.link_down(leader)
        # The other two elect a leader and keep the lease: the guest runs
        # on, protected, its lease renewed, for several leases.
        last = self.talk('h1', port, last, 3 * LEASE)
        st = self.status('h1')
        self.assertEqual(('protected', True),
                         (st['state'], st.get('lease_held')))
        # A host that dies now still fails over, on the remaining two.
        last, _ = self.fail_over('h1', 'h2', port, last)
        self.lab.link_up(leader)
        last = self.talk('h2', port, last, 1)
        copies.stop()
        self.assertEqual(1, copies.most, copies.seen)

    def test_primary_and_secondary_split_both_reaching_etcd(self):
        port = demo.free_port()
        last = self.protect(port)
        copies = self.watch_copies()
        self.lab.cut('h1', 'h2')
        cut = time.monotonic()
        # The secondary hears nothing and contends for the fence, which
        # the primary keeps renewing: it must never resume. The primary
        # drops it (the mark written under its lease) and runs on; its
        # clients see every count once.
        last = self.talk('h1', port, last, 4 * LEASE)
        base.wait_for(
            lambda: self.status('h2').get('state') != 'failing-over', 60,
            0.5, 'the secondary to give up the fence')
        self.assertNotEqual('active', self.status('h2').get('state'))
        self.assertGreater(time.monotonic() - cut, 2 * LEASE)
        last = self.talk('h1', port, last, 1)
        st = self.status('h1')
        self.assertEqual('primary', st['role'])
        self.assertTrue(st.get('lease_held'))
        self.lab.heal('h1', 'h2')
        copies.stop()
        self.assertEqual(1, copies.most, copies.seen)

    def test_primary_cut_off_from_etcd_but_not_from_its_secondary(self):
        port = demo.free_port()
        last = self.protect(port)
        copies = self.watch_copies()
        for member in ETCD_MEMBERS:
            self.lab.cut('h1', member)
        # No lease for the primary, but its secondary still hears it and
        # vouches for it: it runs on, protected, past several leases.
        last = self.talk('h1', port, last, 3 * LEASE)
        st = self.status('h1')
        self.assertEqual(('protected', False),
                         (st['state'], st.get('lease_held')))
        self.assertEqual(1, len(self.qemu_pids()))
        # Its host dies: the secondary waits out its word, wins the
        # lapsed lease and resumes, nothing taken back.
        last, _ = self.fail_over('h1', 'h2', port, last)
        last = self.talk('h2', port, last, 1)
        copies.stop()
        self.assertEqual(1, copies.most, copies.seen)
