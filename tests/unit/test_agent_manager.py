"""The manager's choice of peers and its guest files (no agents, no
QEMU)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import unittest
from unittest import mock

from oslo_config import cfg

from mftvm_openstack import conf
from mftvm_openstack.agent import exception, manager
from mftvm_openstack.cmd import mftvm
from mftvm_openstack.contract.spec import (
    FailoverResult,
    PreparedSecondary,
    ProtectionOptions,
)
from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import InstanceStatus
from mftvm_openstack.ft import pair_tls, vm


def manager_on(test, **agent_options):
    """An AgentManager of host hv1 with its state in a temp dir of
    ``test`` (``test.tmp``), and ``agent_options`` set in ``[agent]``."""
    test.tmp = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, test.tmp, True)
    c = cfg.ConfigOpts()
    conf.register_opts(c)
    c([], project='mftvm-test')
    for name, value in {'host': 'hv1', 'state_path': test.tmp,
                        **agent_options}.items():
        c.set_override(name, value, group='agent')
    return manager.AgentManager(c, agents=object())

def allowed_disk(test, m):
    """A disk file in a directory of ``m``'s ``[agent] disk_dirs``."""
    disks = os.path.join(test.tmp, 'disks')
    os.makedirs(disks, exist_ok=True)
    path = os.path.join(disks, 'd.raw')
    with open(path, 'wb') as f:
        f.truncate(1 << 20)
    m.conf.set_override('disk_dirs', [disks], group='agent')
    return path


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
        self.assertEqual(['h1', 'h3'], m.candidates(None, ()))

    def test_preferred_first(self):
        m = self.make('h1', ['h2', 'h3'])
        self.assertEqual(['h3', 'h2'], m.candidates('h3', ()))

    def test_the_lost_peer_is_asked_last_not_never(self):
        # It may be the only peer left once another one failed too.
        m = self.make('h1', ['h2', 'h3'])
        self.assertEqual(['h3', 'h2'], m.candidates(None, ('h2',)))
        self.assertEqual(['h3'], self.make('h1', ['h3']).candidates(
            None, ('h3',)))


class GuestDirTest(unittest.TestCase):
    """What the agent writes for an instance process, from an RPC spec."""

    def setUp(self):
        self.m = manager_on(self, libvirt_uri='qemu+unix:///system')

    def test_nova_domain_spec_is_accepted_with_libvirt_uri(self):
        # The shape FTLibvirtDriver sends (nova.driver.domain_spec).
        spec = {'name': 'c0ffee00-0000-4000-8000-000000000001',
                'domain': 'instance-00000001', 'memory_mib': 512,
                'smp': 1}
        inst = self.m.new_instance_dir(
            'c0ffee00', vm.GuestSpec.from_json(spec),
            self.m.host_options(ProtectionOptions()))
        with open(os.path.join(inst.dir, 'guest.json')) as f:
            guest = json.load(f)
        self.assertEqual(spec, {k: guest['spec'][k] for k in spec})
        self.assertEqual(vm.GuestSpec.from_json(spec),
                         vm.GuestSpec.from_json(guest['spec']))
        self.assertEqual('qemu+unix:///system',
                         guest['options']['libvirt_uri'])
        loaded = vm.GuestSpec.from_json(guest['spec'])
        self.assertEqual('instance-00000001', loaded.domain)
        self.assertEqual(512 << 20, loaded.memory_bytes)

    def test_idle_epochs_from_the_request_or_the_ft_group(self):
        none = ProtectionOptions()
        self.assertEqual(1000, self.m.host_options(none).idle_epoch_ms)
        self.m.conf.set_override('idle_epoch_ms', 0, group='ft')
        self.assertEqual(0, self.m.host_options(none).idle_epoch_ms)
        self.assertEqual(2500, self.m.host_options(
            ProtectionOptions(idle_epoch_ms=2500)).idle_epoch_ms)

    def test_the_adaptive_epoch_from_the_ft_group(self):
        none = ProtectionOptions()
        opts = self.m.host_options(none)
        self.assertEqual((True, 2, 10, 25), (
            opts.adaptive_epochs, opts.output_batch_ms,
            opts.min_epoch_ms, opts.max_pause_percent))
        self.m.conf.set_override('adaptive_epochs', False, group='ft')
        self.m.conf.set_override('output_batch_ms', 7, group='ft')
        self.m.conf.set_override('min_epoch_ms', 30, group='ft')
        self.m.conf.set_override('max_pause_percent', 20, group='ft')
        opts = self.m.host_options(none)
        self.assertEqual((False, 7, 30, 20), (
            opts.adaptive_epochs, opts.output_batch_ms,
            opts.min_epoch_ms, opts.max_pause_percent))

    def test_spec_without_guest_or_domain_is_refused(self):
        with self.assertRaises(exception.InvalidRequest) as ctx:
            self.m.new_instance_dir(
                'x', vm.GuestSpec(name='x', memory_mib=128),
                self.m.host_options(ProtectionOptions()))
        self.assertIn('libvirt domain', str(ctx.exception))
        self.assertFalse(os.path.exists(os.path.join(self.tmp, 'instances',
                                                     'x')))


class EndedDataTest(unittest.TestCase):
    """A guest that ran here from its replica keeps its disk under
    ended/ when its instance process ends; a stop asked afterwards (Nova's
    delete) must not leave that copy behind."""

    def setUp(self):
        self.m = manager_on(self)

    def test_stop_of_an_ended_instance_deletes_its_kept_data(self):
        ended = os.path.join(self.tmp, 'ended', 'vm0', 'secondary')
        os.makedirs(os.path.join(ended, 'disk'))
        for name in ('disk/base.qcow2', 'disk/epoch-7.qcow2', 'devstate',
                     'secondary-host.log', 'status.json'):
            with open(os.path.join(ended, name), 'w') as f:
                f.write('x')
        self.assertEqual({'instance': 'vm0', 'stopped': True},
                         self.m.stop_instance('vm0'))
        left = sorted(os.path.relpath(os.path.join(d, n), ended)
                      for d, _, names in os.walk(ended) for n in names)
        self.assertEqual(['secondary-host.log', 'status.json'], left)

    def test_stop_of_an_unknown_instance_is_not_found(self):
        with self.assertRaises(exception.InstanceNotFound):
            self.m.stop_instance('vm9')
        with self.assertRaises(exception.InstanceNotFound):
            self.m.disk_settled('vm9')

    def taken_over_then_ended(self):
        """Instance vm0 of a secondary that took the guest over and ran
        it from its replica, its process gone now; its replica files."""
        dead = subprocess.Popen(['true'])
        dead.wait()
        side = os.path.join(self.tmp, 'instances', 'vm0', 'secondary')
        os.makedirs(os.path.join(side, 'disk'))
        with open(os.path.join(side, '..', 'record.json'), 'w') as f:
            json.dump({'role': 'secondary', 'pid': dead.pid,
                       'peer': 'hv0'}, f)
        with open(os.path.join(side, 'status.json'), 'w') as f:
            json.dump({'role': 'primary', 'state': 'active',
                       'host_pid': dead.pid,
                       'takeover': {'detected': 1.0, 'fenced': 2.0,
                                    'resumed': 3.0}}, f)
        for name in ('disk/base.qcow2', 'disk/epoch-7.qcow2', 'devstate',
                     'secondary-host.log'):
            with open(os.path.join(side, name), 'w') as f:
                f.write('x')

    def kept(self):
        ended = os.path.join(self.tmp, 'ended', 'vm0', 'secondary')
        return sorted(os.path.relpath(os.path.join(d, n), ended)
                      for d, _, names in os.walk(ended) for n in names)

    def test_a_replica_the_guest_ran_from_is_kept_when_it_ends(self):
        self.taken_over_then_ended()
        self.m.periodic()
        self.assertEqual(['devstate', 'disk/base.qcow2',
                          'disk/epoch-7.qcow2', 'secondary-host.log',
                          'status.json'], self.kept())
        self.assertFalse(os.path.exists(os.path.join(self.tmp, 'instances',
                                                     'vm0')))

    def test_a_settled_guests_replica_is_not_kept_when_it_ends(self):
        # Nova's driver moved the guest onto its own disk and said so:
        # the replica is nobody's disk (seen in the cloud lab: kept under
        # ended/ after Nova's stop on the new host, never deleted)
        self.taken_over_then_ended()
        self.assertEqual({'instance': 'vm0', 'disk_settled': True},
                         self.m.disk_settled('vm0'))
        self.m.periodic()
        self.assertEqual(['secondary-host.log', 'status.json'],
                         self.kept())

    def test_settled_after_it_ended_deletes_what_was_kept(self):
        self.taken_over_then_ended()
        self.m.periodic()
        self.assertEqual({'instance': 'vm0', 'disk_settled': True},
                         self.m.disk_settled('vm0'))
        self.assertEqual(['secondary-host.log', 'status.json'],
                         self.kept())


class FakeInstanceProcess:
    """An instance directory with a published status.json and a control
    socket answering like an instance process (this test's process
    stands for it: its pid is alive)."""

    def __init__(self, root: str, name: str, role: str,
                 status: dict, peer: str = 'hv2') -> None:
        self.dir = os.path.join(root, 'instances', name)
        self.role = role
        os.makedirs(os.path.join(self.dir, role))
        with open(os.path.join(self.dir, 'record.json'), 'w') as f:
            json.dump({'role': role, 'peer': peer, 'pid': os.getpid()}, f)
        self.publish(status)
        self.requests: list[dict] = []
        #: called with each request; returns (reply, status to publish)
        self.answer = lambda request: ({'ok': True}, None)
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(os.path.join(self.dir, role, 'control.sock'))
        self.server.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def publish(self, status: dict) -> None:
        status = dict(status, host_pid=os.getpid())
        with open(os.path.join(self.dir, self.role, 'status.json'),
                  'w') as f:
            json.dump(status, f)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                request = json.loads(conn.makefile().readline())
                self.requests.append(request)
                reply, status = self.answer(request)
                # published first: the caller's next look sees it (no
                # polling interval to sleep through)
                if status is not None:
                    self.publish(status)
                conn.sendall(json.dumps(reply).encode() + b'\n')

    def close(self) -> None:
        self.server.close()


class RemoteListTest(unittest.TestCase):

    def test_list_shows_a_few_fields_per_instance(self):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            mftvm.print_remote_list([InstanceStatus(
                role=Role.PRIMARY, state=State.PROTECTED, alive=True,
                epochs=9, instance='vm0', host='hv1', peer='hv2')])
            mftvm.print_remote_list([])
        self.assertEqual('vm0 role=primary state=protected alive=True '
                         'peer=hv2 epochs=9 last_committed_epoch=0\n'
                         'no instances\n', out.getvalue())


class StatusTest(unittest.TestCase):
    """What the agent answers about an instance: the contract's status."""

    def setUp(self):
        self.m = manager_on(self)

    def instance(self, role: str, **status) -> FakeInstanceProcess:
        proc = FakeInstanceProcess(self.tmp, 'vm0', role, dict(
            {'role': role, 'state': 'protected'}, **status))
        self.addCleanup(proc.close)
        return proc

    def test_pauses_reach_the_agents_status(self):
        # Bug: the agent kept only 'pause_p50_ms'/'pause_p99_ms', keys no
        # instance process publishes: its status never showed a pause.
        self.instance('primary', epochs=40, last_committed_epoch=39,
                      pause_ms_p50=12.5, pause_ms_p99=31.0,
                      pause_parts_ms_p50={'devstate': 4.0, 'ram': 6.0,
                                          'disk_mark': 1.0})
        st = self.m.status('vm0')
        self.assertEqual(12.5, st['pause_ms_p50'])
        self.assertEqual(31.0, st['pause_ms_p99'])
        self.assertEqual({'devstate': 4.0, 'ram': 6.0, 'disk_mark': 1.0},
                         st['pause_parts_ms_p50'])

    def test_status_is_an_instance_status_with_the_agents_view(self):
        self.instance('primary', epochs=3, pair_id='p-1')
        st = self.m.status('vm0')
        typed = InstanceStatus.from_dict(st)
        self.assertEqual(State.PROTECTED, typed.state)
        self.assertEqual(Role.PRIMARY, typed.role)
        self.assertEqual(('vm0', 'hv1', 'hv2', True, os.getpid()),
                         (typed.instance, typed.host, typed.peer,
                          typed.alive, typed.host_pid))
        self.assertEqual(typed.to_dict(), st)
        self.assertEqual([st], self.m.list())

    def test_a_status_off_the_contract_is_refused_not_passed_on(self):
        self.instance('primary', pause_p50_ms=3.0)
        with self.assertRaises(exception.Conflict) as ctx:
            self.m.status('vm0')
        self.assertIn('pause_p50_ms', str(ctx.exception))
        self.assertEqual([], self.m.list())

    def test_failover_answers_how_long_the_takeover_took(self):
        # Bug: `mftvm failover --host` printed the agent's 'failover_ms',
        # which the agent's failover never returned.
        proc = self.instance('secondary', state='standby')
        proc.answer = lambda request: ({'ok': True}, {
            'role': 'primary', 'state': 'active', 'failover_ms': 412.5})
        reply = self.m.failover('vm0')
        self.assertEqual([{'op': 'failover', 'secondary': None,
                           'pair_id': None}], proc.requests)
        result = FailoverResult.from_dict(reply)
        self.assertEqual(412.5, result.failover_ms)
        self.assertEqual('hv1', result.runs_on)
        self.assertEqual('vm0 now runs on hv1 (failover 412.5 ms)',
                         mftvm.failover_line('vm0', result))

    def test_planned_failover_names_the_peer(self):
        proc = self.instance('primary')
        result = FailoverResult.from_dict(self.m.failover('vm0'))
        self.assertEqual(['failover'], [r['op'] for r in proc.requests])
        self.assertEqual(('hv2', None), (result.runs_on,
                                         result.failover_ms))

    def test_failover_refused_by_the_instance_is_a_conflict(self):
        proc = self.instance('primary', state='unprotected')
        proc.answer = lambda request: ({'ok': False, 'error': 'the guest '
                                        'is not protected'}, None)
        with self.assertRaises(exception.Conflict) as ctx:
            self.m.failover('vm0')
        self.assertIn('not protected', str(ctx.exception))


class PairCredentialsTest(unittest.TestCase):
    """prepare_secondary makes the pair's credentials; the reply alone
    takes the primary's half to the primary's agent."""

    def setUp(self):
        # the agent's usual umask: what it makes on the way is 0755
        self.addCleanup(os.umask, os.umask(0o022))
        self.m = manager_on(self, my_ip='127.0.0.1')
        self.spec = vm.GuestSpec(name='vm0', kernel='/k', initrd='/i',
                                 disk=allowed_disk(self, self.m))
        # A plain function, which the class binds like the real method
        # (an autospec mock lost the instance once another tier's
        # fixtures had run in the same process).
        spawn = mock.patch.object(
            manager.Instance, 'spawn',
            lambda inst, role, secrets=None: self.fake_spawn(inst, role,
                                                             secrets))
        spawn.start()
        self.addCleanup(spawn.stop)

    def fake_spawn(self, inst, role, secrets=None):
        # an instance process that at once says it listens (secondary)
        # or is protected (primary)
        status = {'role': str(role), 'host_pid': os.getpid(),
                  'state': 'standby' if role == Role.SECONDARY
                  else 'protected', 'last_committed_epoch': 1,
                  'listen': 'tcp:127.0.0.1:4711'}
        with open(os.path.join(inst.dir, 'record.json')) as f:
            record = json.load(f)
        with open(os.path.join(inst.dir, 'record.json'), 'w') as f:
            json.dump(dict(record, role=str(role), pid=os.getpid()), f)
        os.makedirs(os.path.join(inst.dir, str(role)), exist_ok=True)
        with open(os.path.join(inst.dir, str(role), 'status.json'),
                  'w') as f:
            json.dump(status, f)
        return os.getpid()

    def test_the_secondary_keeps_its_half_and_answers_the_primarys(self):
        reply = PreparedSecondary.from_dict(self.m.prepare_secondary(
            'vm0', self.spec, ProtectionOptions(), 'hv0'))
        creds = reply.credentials
        self.assertIsNotNone(creds)
        server = os.path.join(self.tmp, 'instances', 'vm0', 'tls', 'server')
        # the dir and its parent (made on the way, whatever the umask)
        for d in (server, os.path.dirname(server)):
            self.assertEqual(0o700, os.stat(d).st_mode & 0o777, d)
        for name in ('ca-cert.pem', 'server-cert.pem', 'server-key.pem'):
            self.assertEqual(0o600, os.stat(os.path.join(
                server, name)).st_mode & 0o777)
        with open(os.path.join(server, 'ca-cert.pem')) as f:
            self.assertEqual(creds.ca_cert, f.read())
        with open(os.path.join(server, 'server-key.pem')) as f:
            self.assertNotIn(f.read(), json.dumps(reply.to_dict()))
        with open(os.path.join(self.tmp, 'instances', 'vm0',
                               'guest.json')) as f:
            guest = json.load(f)
        self.assertTrue(guest['options']['tls'])
        self.assertNotIn('PRIVATE KEY', json.dumps(guest))

    def test_a_secondary_that_did_not_start_keeps_its_logs(self):
        # The refusal says where to read why; its logs are there, its
        # data is not (what the message named once was deleted with it).
        dead = subprocess.Popen(['true'])
        dead.wait()

        def fails(inst, role, secrets=None):
            with open(os.path.join(inst.dir, 'record.json')) as f:
                record = json.load(f)
            with open(os.path.join(inst.dir, 'record.json'), 'w') as f:
                json.dump(dict(record, role=str(role), pid=dead.pid), f)
            side = os.path.join(inst.dir, str(role))
            os.makedirs(os.path.join(side, 'disk'))
            with open(os.path.join(side, 'instance.log'), 'w') as f:
                f.write('ERROR cannot listen: address in use\n')
            with open(os.path.join(side, 'disk', 'base.raw'), 'w') as f:
                f.write('tenant data')
            return dead.pid
        self.fake_spawn = fails
        with self.assertRaises(exception.Conflict) as ctx:
            self.m.prepare_secondary('vm0', self.spec, ProtectionOptions(),
                                     'hv0')
        kept = os.path.join(self.tmp, 'ended', 'vm0')
        self.assertIn(f'see the logs in {kept}', str(ctx.exception))
        with open(os.path.join(kept, 'secondary', 'instance.log')) as f:
            self.assertIn('address in use', f.read())
        self.assertEqual(0o700, os.stat(kept).st_mode & 0o777)
        self.assertFalse(os.path.exists(os.path.join(kept, 'secondary',
                                                     'disk', 'base.raw')))
        self.assertFalse(os.path.exists(os.path.join(
            self.tmp, 'instances', 'vm0')))

    def test_tls_off_makes_no_credentials(self):
        self.m.conf.set_override('tls', False, group='replication')
        reply = PreparedSecondary.from_dict(self.m.prepare_secondary(
            'vm0', self.spec, ProtectionOptions(), 'hv0'))
        self.assertIsNone(reply.credentials)
        self.assertFalse(os.path.exists(os.path.join(
            self.tmp, 'instances', 'vm0', 'tls')))

    def agents_answering(self, reply):
        """A manager whose peer hv2 answers ``reply``; the list of the
        stop_instance calls it is told."""
        told = []

        class Agents:
            def prepare_secondary(self, ctxt, host, *args):
                return reply

            def stop_instance(self, ctxt, host, instance):
                told.append((host, instance))
        self.m = manager.AgentManager(self.m.conf, agents=Agents())
        self.m.conf.set_override('peers', ['hv2'], group='agent')
        return told

    def test_the_primary_keeps_the_credentials_of_the_reply(self):
        creds = pair_tls.PairCredentials.generate()
        self.agents_answering(PreparedSecondary(
            host='hv2', data_address='tcp:10.0.0.2:4711',
            credentials=creds.client_bundle()).to_dict())
        self.m.protect('vm0', self.spec, ProtectionOptions(), None)
        client = os.path.join(self.tmp, 'instances', 'vm0', 'tls', 'client')
        with open(os.path.join(client, 'client-key.pem')) as f:
            self.assertEqual(creds.client_key, f.read())
        self.assertEqual(0o600, os.stat(os.path.join(
            client, 'client-key.pem')).st_mode & 0o777)
        for d in (client, os.path.dirname(client)):
            self.assertEqual(0o700, os.stat(d).st_mode & 0o777, d)
        self.assertEqual(creds.pair_key, pair_tls.read_pair_key(client))

    def test_a_peer_without_tls_is_passed_over(self):
        told = self.agents_answering(PreparedSecondary(
            host='hv2', data_address='tcp:10.0.0.2:4711').to_dict())
        with self.assertRaisesRegex(exception.PeerUnreachable,
                                    'tls is off'):
            self.m.protect('vm0', self.spec, ProtectionOptions(), None)
        self.assertEqual([('hv2', 'vm0')], told)


class PeerAnswersTest(unittest.TestCase):
    """The guest's memory goes only to the agent that was asked: the
    caller names a host (an agent's RPC server), never an address, and an
    answer in the name of another agent is refused."""

    class Agents:
        def __init__(self, answers):
            self.answers, self.asked = answers, []

        def prepare_secondary(self, ctxt, host, instance, spec, options,
                              primary_host):
            self.asked.append(host)
            return self.answers[host]

    def test_an_answer_from_another_agent_is_refused(self):
        m = manager_on(self, peers=['hv3'])
        agents = m._agents = self.Agents({
            'hv2': {'host': 'evil', 'data_address': 'tcp:203.0.113.9:4711'},
            'hv3': {'host': 'hv2', 'data_address': 'tcp:203.0.113.9:4711'}})
        spec = vm.GuestSpec.from_json({'name': 'vm0', 'kernel': '/k',
                                       'initrd': '/i',
                                       'disk': allowed_disk(self, m)})
        with self.assertRaises(exception.PeerUnreachable) as ctx:
            m.protect('vm0', spec, ProtectionOptions(), secondary_host='hv2')
        self.assertEqual(['hv2', 'hv3'], agents.asked)
        self.assertIn('the answer came from agent evil, not hv2',
                      str(ctx.exception))
        self.assertIn('the answer came from agent hv2, not hv3',
                      str(ctx.exception))
        # no primary was started to stream the guest anywhere
        self.assertFalse(os.path.exists(os.path.join(
            self.tmp, 'instances', 'vm0', 'guest.json')))


class ReprotectLogTest(unittest.TestCase):
    """A guest that runs here unprotected is re-protected every ``[agent]
    reprotect_retry_interval``; with no peer to take it (no ``[agent]
    peers``, as under Nova, whose driver re-protects) every try fails.
    Seen in the cloud lab: a warning every 5 s after each takeover. A
    failure is a warning once per reason, then debug."""

    class Agents:
        def prepare_secondary(self, ctxt, host, *args):
            raise exception.PeerUnreachable(host=host, reason='no answer')

    def setUp(self):
        self.m = manager_on(self, reprotect_retry_interval=0.5)
        self.m._agents = self.Agents()
        proc = FakeInstanceProcess(self.tmp, 'vm0', 'secondary', {
            'role': 'primary', 'state': 'active'}, peer='hv0')
        self.addCleanup(proc.close)
        with open(os.path.join(proc.dir, 'guest.json'), 'w') as f:
            json.dump({'spec': {'name': 'vm0', 'domain': 'instance-1',
                                'memory_mib': 128},
                       'options': self.m.host_options(
                           ProtectionOptions()).to_dict()}, f)

    def tries(self, count):
        """``count`` looks of the agent, each one re-protection try;
        the messages it logged at WARNING and at DEBUG."""
        with self.assertLogs(manager.LOG, 'DEBUG') as logs:
            for _ in range(count):
                self.m.periodic()
                for thread in threading.enumerate():
                    if thread.name == 'reprotect-vm0':
                        thread.join(10)
                # the next try only once the retry interval has passed
                time.sleep(0.55)
        tried = [r for r in logs.records
                 if 'cannot re-protect now' in r.getMessage()]
        self.assertEqual(count, len(tried))
        return ([r.getMessage() for r in tried if r.levelname == 'WARNING'],
                [r.getMessage() for r in tried if r.levelname == 'DEBUG'])

    def test_a_failure_is_a_warning_once_per_reason(self):
        warned, quiet = self.tries(3)
        self.assertEqual(1, len(warned), warned)
        self.assertIn('no peer configured', warned[0])
        self.assertEqual(2, len(quiet))
        # a new reason is a new warning, once
        self.m.conf.set_override('peers', ['hv2'], group='agent')
        warned, quiet = self.tries(2)
        self.assertEqual(1, len(warned), warned)
        self.assertIn('hv2: ', warned[0])
        self.assertIn('no answer', warned[0])
        self.assertEqual(1, len(quiet))
