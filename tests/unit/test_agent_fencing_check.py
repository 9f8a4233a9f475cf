"""The agent's start-up look at its fencing store (``cmd.agent``).

``fencing.check_store`` asks the store one read; ``check_fencing`` logs
the answer, never the store's password::

    fencing store etcd3+http://10.0.0.5:2379 answers
"""

from __future__ import annotations

import shutil
import tempfile
import warnings

import fixtures
import testtools
from oslo_config import cfg

from mftvm_openstack import conf as mftvm_conf
from mftvm_openstack import fencing
from mftvm_openstack.cmd import agent

#: nothing listens on port 1
DEAD_ETCD = 'etcd3+http://u:s3cret@127.0.0.1:1?timeout=0.5'


class CheckStoreTest(testtools.TestCase):

    def setUp(self) -> None:
        super().setUp()
        warnings.simplefilter('ignore', DeprecationWarning)
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)

    def test_a_store_that_answers(self):
        # tooz's file driver: a store that needs no server
        fencing.check_store(f'file://{self.dir}', member='hv1')

    def test_an_etcd_that_does_not_answer(self):
        exc = self.assertRaises(fencing.FenceError, fencing.check_store,
                                DEAD_ETCD, member='hv1')
        self.assertIn('127.0.0.1:1', str(exc))
        self.assertNotIn('s3cret', str(exc))

    def test_a_malformed_url(self):
        self.assertRaises(ValueError, fencing.check_store,
                          'etcd3+http://h:99999', member='hv1')


class AgentCheckFencingTest(testtools.TestCase):

    def setUp(self) -> None:
        super().setUp()
        warnings.simplefilter('ignore', DeprecationWarning)
        self.conf = cfg.ConfigOpts()
        mftvm_conf.register_opts(self.conf)
        self.conf([], project='mftvm')
        self.log = self.useFixture(fixtures.FakeLogger(
            name=agent.LOG.logger.name))
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir, True)

    def test_logs_a_store_that_answers(self):
        self.conf.set_override('backend_url', f'file://{self.dir}',
                               'fencing')
        self.assertTrue(agent.check_fencing(self.conf))
        self.assertIn(f'fencing store file://{self.dir} answers',
                      self.log.output)

    def test_logs_a_store_that_does_not_answer(self):
        self.conf.set_override('backend_url', DEAD_ETCD, 'fencing')
        self.assertFalse(agent.check_fencing(self.conf))
        self.assertIn('fencing store etcd3+http://u:***@127.0.0.1:1',
                      self.log.output)
        self.assertIn('does not answer', self.log.output)
        self.assertNotIn('s3cret', self.log.output)

    def test_lock_files(self):
        self.assertTrue(agent.check_fencing(self.conf))
        self.assertIn('fencing with lock files in /run/mftvm/fence',
                      self.log.output)
