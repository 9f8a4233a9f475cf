"""The lab's etcd cluster: healthy when set up, nothing left after."""

from __future__ import annotations

import os
import signal

import testtools

from tests.integration import lab as ftlab


def _alive(pid: int) -> bool:
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().split(') ', 1)[1][0] != 'Z'
    except OSError:
        return False


class EtcdClusterTest(testtools.TestCase):

    def _check(self, lab: ftlab.Lab | None) -> None:
        cluster = ftlab.EtcdCluster(lab)
        with cluster:
            pids = [cluster.process(m).pid for m in cluster.members]
            self.assertIsNotNone(cluster.leader())
            ids = {cluster.status(m)['header']['member_id']
                   for m in cluster.members}
            self.assertEqual(3, len(ids))
            data = cluster.data_dir
            # A frozen member must not outlive the fixture either.
            cluster.process('e2').send_signal(signal.SIGSTOP)
        self.assertEqual([], [p for p in pids if _alive(p)])
        self.assertFalse(os.path.exists(data))

    def test_in_the_root_namespace(self):
        self._check(None)

    def test_one_member_per_lab_host(self):
        lab = self.useFixture(ftlab.Lab(hosts=('e1', 'e2', 'e3')))
        self._check(lab)
        self.assertEqual([], lab.pids('e1'))

    def test_an_even_cluster_is_refused(self):
        self.assertRaises(ValueError, ftlab.EtcdCluster, None, ('a', 'b'))
