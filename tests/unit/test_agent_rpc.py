"""The agent's RPC API: client, endpoint checks, service, over fake://.

Most checks call the endpoint directly (fast); the tests that go over the
wire use oslo.messaging's in-process ``fake://`` driver (each call ~50 ms:
it polls) with one agent service per test class.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import unittest
from typing import Any

import fixtures
import oslo_messaging
import testtools
from oslo_messaging._drivers import common as om_common
from testtools.matchers import StartsWith

from mftvm_openstack import conf
from mftvm_openstack.agent import exception, rpc, rpcapi, service
from mftvm_openstack.contract import plugins
from mftvm_openstack.contract.spec import GuestSpec, ProtectionOptions

CONF = conf.CONF
HOST = 'hv-unit'
GOOD_SPEC = {'name': 'vm0', 'memory_mib': 128, 'disk': '/tmp/vm0.img'}
GOOD_OPTIONS = {'epoch_ms': 100, 'disk_sync': 'block-copy',
                'tracker': 'scan', 'start_delay': 0.5}
#: the smallest spec the endpoint lets through: a name (whether it says
#: what to run is the manager's check)
BARE_SPEC = {'name': 'vm0'}


def spec(data=None, **fields):
    """The GuestSpec the manager receives for ``data``."""
    return GuestSpec.from_dict(dict(data or GOOD_SPEC, **fields))


def options(data=None):
    """The ProtectionOptions the manager receives for ``data``."""
    return ProtectionOptions.from_dict(GOOD_OPTIONS if data is None
                                       else data)


class FakeManager:
    """Records every call; some instance names make it fail."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.periodic_calls = 0
        self.periodic_error: BaseException | None = None
        #: notified at every periodic call
        self.periodic_ran = threading.Condition()
        self.started = self.stopped = False
        self.lock = threading.Lock()

    def _record(self, *call: Any) -> dict[str, Any]:
        with self.lock:
            self.calls.append(call)
        instance = call[1] if len(call) > 1 else None
        if instance == 'crash':
            raise RuntimeError('disk on fire\nsecond line')
        if instance == 'busy':
            raise exception.Conflict(instance=instance,
                                     reason='is already protected')
        if instance == 'ghost':
            raise exception.InstanceNotFound(instance=instance)
        return {'method': call[0], 'instance': instance}

    def prepare_secondary(self, instance, spec, options, primary_host):
        return self._record('prepare_secondary', instance, spec, options,
                            primary_host)

    def protect(self, instance, spec, options, secondary_host):
        return self._record('protect', instance, spec, options,
                            secondary_host)

    def unprotect(self, instance):
        return self._record('unprotect', instance)

    def failover(self, instance):
        return self._record('failover', instance)

    def stop_instance(self, instance):
        return self._record('stop_instance', instance)

    def disk_settled(self, instance):
        return self._record('disk_settled', instance)

    def status(self, instance):
        return self._record('status', instance)

    def list(self):
        with self.lock:
            self.calls.append(('list',))
        return [{'instance': 'vm0', 'role': 'primary'}]

    def periodic(self):
        with self.periodic_ran:
            self.periodic_calls += 1
            self.periodic_ran.notify_all()
        if self.periodic_error is not None:
            raise self.periodic_error

    def start(self):
        self.started = True

    def stop(self):
        self.stopped = True


def refusal(call: Any, *args: Any, **kwargs: Any) -> BaseException:
    """The MftvmError an endpoint method raised.

    Endpoint methods are wrapped by ``oslo_messaging.expected_exceptions``,
    so a direct call raises ExpectedException around it.
    """
    try:
        call(*args, **kwargs)
    except oslo_messaging.ExpectedException as wrapper:
        return wrapper.exc_info[1]
    raise AssertionError('the call was not refused')


class EndpointChecksTest(testtools.TestCase):
    """Every rule of AgentEndpoint, called directly (no transport)."""

    def setUp(self) -> None:
        super().setUp()
        self.manager = FakeManager()
        self.endpoint = rpc.AgentEndpoint(self.manager, host=HOST)
        self.log = self.useFixture(fixtures.FakeLogger(level=logging.INFO))

    def assertInvalid(self, field: str, method: str, **kwargs: Any) -> str:
        exc = refusal(getattr(self.endpoint, method), {}, **kwargs)
        self.assertIsInstance(exc, exception.InvalidRequest)
        self.assertEqual(field, exc.kwargs['field'])
        self.assertIn(field, str(exc))
        self.assertNotIn('\n', str(exc))
        self.assertEqual([], self.manager.calls)
        return str(exc)

    def protect(self, **overrides: Any) -> dict[str, Any]:
        return dict({'instance': 'vm0', 'spec': dict(GOOD_SPEC),
                     'options': dict(GOOD_OPTIONS),
                     'secondary_host': 'hv2'}, **overrides)

    def test_good_requests_reach_the_manager(self):
        self.endpoint.protect({}, **self.protect())
        self.endpoint.protect({}, instance='a', spec={'name': 'a'},
                              options={})
        self.endpoint.prepare_secondary(
            {}, instance='A-1_b.c', spec=BARE_SPEC,
            options={'epoch_ms': 20}, primary_host='hv1.example.org')
        self.endpoint.status({}, instance='x' * 63)
        self.assertEqual(
            [('protect', 'vm0', spec(), options(), 'hv2'),
             ('protect', 'a', GuestSpec(name='a'), ProtectionOptions(),
              None),
             ('prepare_secondary', 'A-1_b.c', GuestSpec(name='vm0'),
              ProtectionOptions(epoch_ms=20), 'hv1.example.org'),
             ('status', 'x' * 63)],
            self.manager.calls)

    def test_instance_names(self):
        for bad in ('vm 0', '-vm', '.vm', 'x' * 64, '', 'vm/0', 'vm0\n',
                    'vm;rm'):
            self.assertInvalid('instance', 'status', instance=bad)
            self.assertInvalid('instance', 'disk_settled', instance=bad)
        for bad in (7, None, ['vm0'], b'vm0'):
            msg = self.assertInvalid('instance', 'failover', instance=bad)
            self.assertIn('must be a string', msg)

    def test_spec_must_be_a_dict(self):
        for bad in ([], 'spec', None, 3):
            msg = self.assertInvalid('spec', 'protect',
                                     **self.protect(spec=bad))
            self.assertIn('must be a dict', msg)
        self.assertInvalid('spec', 'protect', **self.protect(spec={1: 2}))

    # -- the guest spec: hostile values for every field --------------------

    def assertSpecInvalid(self, field: str, **fields: Any) -> str:
        """``fields`` over a good spec are refused as ``spec.<field>``,
        on both methods that take a spec, before the manager runs."""
        bad = dict(GOOD_SPEC, **fields)
        self.assertInvalid(f'spec.{field}', 'prepare_secondary',
                           instance='vm0', spec=bad, options={},
                           primary_host='hv1')
        return self.assertInvalid(f'spec.{field}', 'protect',
                                  **self.protect(spec=bad))

    def test_issue_11_hostfwd_injection_is_refused(self):
        # a guestfwd whose command would run on the host, smuggled into
        # QEMU's -netdev user,hostfwd=... through a port number
        msg = self.assertSpecInvalid('forwards[0].host_port', forwards=[{
            'host_addr': '127.0.0.1',
            'host_port': '1-:2,guestfwd=tcp:10.0.2.9:9-cmd:touch x',
            'guest_port': 80}])
        self.assertIn('must be an integer', msg)

    def test_spec_name(self):
        for bad in ('vm 0', '-vm', '.vm', '', 'x' * 64, 'vm0\n', '../x',
                    'vm,x', 7, None, ['vm0']):
            self.assertSpecInvalid('name', name=bad)
        kwargs = self.protect(spec={'disk': '/tmp/d'})
        self.assertIn('required', self.assertInvalid('spec.name', 'protect',
                                                     **kwargs))

    def test_spec_paths(self):
        for key in ('kernel', 'initrd', 'disk'):
            for bad in ('relative/img', 'img', '/a,b', '/a,file.driver=x',
                        '/a\nb', '/a\x00b', '/a\x7f', '/a\tb',
                        '/' + 'a' * 5000, 3, None, ['/a']):
                self.assertSpecInvalid(key, **{key: bad})
            self.endpoint.protect({}, **self.protect(
                spec=dict(GOOD_SPEC, **{key: '/var/lib/a b/ü.img'})))
            self.manager.calls.clear()

    def test_spec_append(self):
        for bad in ('quiet\ninit=/bin/sh', '\x1b[2J', 'x' * 4097, 5,
                    None):
            self.assertSpecInvalid('append', append=bad)
        self.endpoint.protect({}, **self.protect(
            spec=dict(GOOD_SPEC, append='console=ttyS0,115200 quiet')))

    def test_spec_disk_format_and_accel(self):
        for bad in ('vmdk', 'raw,file=x', '', 'RAW', None, 1):
            self.assertSpecInvalid('disk_format', disk_format=bad)
        for bad in ('hvf', 'kvm,x', '', None, True):
            self.assertSpecInvalid('accel', accel=bad)
        for fmt in ('raw', 'qcow2'):
            for accel in ('tcg', 'kvm'):
                self.endpoint.protect({}, **self.protect(spec=dict(
                    GOOD_SPEC, disk_format=fmt, accel=accel)))

    def test_spec_sizes(self):
        for bad in (15, 65537, 0, -128, '128', 128.0, True, None):
            self.assertSpecInvalid('memory_mib', memory_mib=bad)
        for bad in (0, 65, -1, '1', 1.0, False, None):
            self.assertSpecInvalid('smp', smp=bad)
        for bad in (-1, 1 << 51, '1024', 1.5, True, None):
            self.assertSpecInvalid('disk_size', disk_size=bad)
        for good in ({'memory_mib': 16, 'smp': 1, 'disk_size': 0},
                     {'memory_mib': 65536, 'smp': 64,
                      'disk_size': 1 << 40}):
            self.endpoint.protect({}, **self.protect(
                spec=dict(GOOD_SPEC, **good)))

    def test_spec_forwards(self):
        good = {'host_addr': '127.0.0.1', 'host_port': 8080,
                'guest_port': 80}
        for bad in ('tcp:127.0.0.1:80-:80', {}, None, [[1, 2, 3]]):
            self.assertSpecInvalid('forwards' if not isinstance(bad, list)
                                   else 'forwards[0]', forwards=bad)
        self.assertSpecInvalid('forwards', forwards=[good] * 65)
        self.assertSpecInvalid('forwards[0].hostfwd', forwards=[
            dict(good, hostfwd='udp::1-:1')])
        self.assertSpecInvalid('forwards[0].guest_port', forwards=[
            {'host_addr': '127.0.0.1', 'host_port': 8080}])
        for bad in ('0.0.0.0,guestfwd=tcp:10.0.2.9:9-cmd:id', '256.0.0.1',
                    '1.2.3', '01.2.3.4', 'localhost', '::1', '', ' 1.2.3.4',
                    '1.2.3.4\n', 16777343, None):
            self.assertSpecInvalid('forwards[0].host_addr', forwards=[
                dict(good, host_addr=bad)])
        for key in ('host_port', 'guest_port'):
            for bad in ('80', '1-:2', 0, 65536, -1, 80.0, True, None):
                self.assertSpecInvalid(f'forwards[0].{key}', forwards=[
                    dict(good, **{key: bad})])
        self.endpoint.protect({}, **self.protect(spec=dict(
            GOOD_SPEC, forwards=[good, dict(good, host_addr='0.0.0.0',
                                            host_port=1, guest_port=65535)])))

    def test_spec_domain(self):
        for bad in ('dom 1', 'a/b', '-x', 'x' * 64, 'd\n', 'a,b', 3,
                    None):
            self.assertSpecInvalid('domain', domain=bad)
        nova = {'name': 'c0ffee00-0000-4000-8000-000000000001',
                'domain': 'instance-00000001'}
        self.endpoint.protect({}, **self.protect(
            instance=nova['name'], spec=nova))

    def test_spec_domain_is_the_named_instances_own(self):
        # A domain is adopted for spec.name (its uuid, for Nova's): the
        # call names one instance, not the agent one and the spec another.
        nova = {'name': 'c0ffee00-0000-4000-8000-000000000001',
                'domain': 'instance-00000001'}
        for method, kwargs in (
                ('protect', self.protect(spec=nova)),
                ('prepare_secondary', {
                    'instance': 'vm0', 'spec': nova, 'options': {},
                    'primary_host': 'hv1'})):
            msg = self.assertInvalid('spec.name', method, **kwargs)
            self.assertIn("must be the instance ('vm0')", msg)

    def test_spec_unknown_fields(self):
        for key in ('qemu_args', 'netdev', 'Name'):
            msg = self.assertSpecInvalid(key, **{key: 'x'})
            self.assertIn('not a field of GuestSpec', msg)

    def test_options_null_is_not_a_default(self):
        for key in ('epoch_ms', 'idle_epoch_ms', 'disk_sync', 'tracker',
                    'start_delay'):
            msg = self.assertInvalid(f'options.{key}', 'protect',
                                     **self.protect(options={key: None}))
            self.assertIn('leave it out', msg)

    def test_options_must_be_a_dict_of_known_keys(self):
        self.assertInvalid('options', 'protect', **self.protect(options=[]))
        msg = self.assertInvalid('options.epoch', 'protect',
                                 **self.protect(options={'epoch': 100}))
        self.assertIn('epoch_ms', msg)       # lists the known keys

    def test_epoch_ms(self):
        for bad in (19, 10001, 0, -200, '200', 200.0, True, None):
            self.assertInvalid('options.epoch_ms', 'protect',
                               **self.protect(options={'epoch_ms': bad}))
        for good in (20, 10000):
            self.endpoint.protect({}, **self.protect(
                options={'epoch_ms': good}))

    def test_idle_epoch_ms(self):
        for bad in (-1, 60001, '1000', 1000.0, False, None):
            self.assertInvalid('options.idle_epoch_ms', 'protect',
                               **self.protect(options={'idle_epoch_ms': bad}))
        for good in (0, 60000):
            self.endpoint.protect({}, **self.protect(
                options={'idle_epoch_ms': good}))

    def test_disk_sync_and_tracker(self):
        for bad in ('rsync', '', None, 1):
            self.assertInvalid('options.disk_sync', 'protect',
                               **self.protect(options={'disk_sync': bad}))
            self.assertInvalid('options.tracker', 'prepare_secondary',
                               instance='vm0', spec=BARE_SPEC,
                               options={'tracker': bad}, primary_host='h')
        for sync in plugins.disk_sync_choices():
            for tracker in plugins.tracker_choices():
                self.endpoint.protect({}, **self.protect(
                    options={'disk_sync': sync, 'tracker': tracker}))

    def test_start_delay(self):
        for bad in (-0.1, -1, 'soon', True, None, float('nan'),
                    float('inf')):
            self.assertInvalid('options.start_delay', 'protect',
                               **self.protect(options={'start_delay': bad}))
        for good in (0, 0.0, 2.5, 30):
            self.endpoint.protect({}, **self.protect(
                options={'start_delay': good}))

    def test_host_names(self):
        self.assertInvalid('primary_host', 'prepare_secondary',
                           instance='vm0', spec=BARE_SPEC, options={},
                           primary_host='hv 1')
        self.assertInvalid('primary_host', 'prepare_secondary',
                           instance='vm0', spec=BARE_SPEC, options={},
                           primary_host=None)
        self.assertInvalid('secondary_host', 'protect',
                           **self.protect(secondary_host=''))
        self.assertInvalid('secondary_host', 'protect',
                           **self.protect(secondary_host=5))

    def test_missing_and_unknown_arguments(self):
        kwargs = self.protect()
        del kwargs['spec']
        msg = self.assertInvalid('spec', 'protect', **kwargs)
        self.assertIn('required', msg)
        self.assertInvalid('primary_host', 'prepare_secondary',
                           instance='vm0', spec=BARE_SPEC, options={})
        msg = self.assertInvalid('force', 'failover', instance='vm0',
                                 force=True)
        self.assertIn('not an argument of failover', msg)
        self.assertInvalid('instance', 'list', instance='vm0')

    def test_unexpected_manager_error_is_logged_and_one_line(self):
        exc = refusal(self.endpoint.status, {}, instance='crash')
        self.assertIsInstance(exc, exception.InternalError)
        self.assertEqual('status failed on host hv-unit: RuntimeError: '
                         'disk on fire ...', str(exc))
        self.assertIn('Traceback', self.log.output)
        self.assertIn('disk on fire', self.log.output)

    def test_manager_errors_pass_as_they_are_without_traceback(self):
        exc = refusal(self.endpoint.protect, {}, **self.protect(
            instance='busy'))
        self.assertIsInstance(exc, exception.Conflict)
        exc = refusal(self.endpoint.unprotect, {}, instance='ghost')
        self.assertIsInstance(exc, exception.InstanceNotFound)
        self.assertNotIn('Traceback', self.log.output)

    def test_unserializable_result_is_an_internal_error(self):
        self.manager.status = lambda instance: {'when': object()}
        exc = refusal(self.endpoint.status, {}, instance='vm0')
        self.assertIsInstance(exc, exception.InternalError)


class ExceptionsTest(testtools.TestCase):
    """Exceptions survive oslo.messaging's (de)serialization."""

    def roundtrip(self, exc: BaseException) -> BaseException:
        try:
            raise exc
        except Exception:
            data = om_common.serialize_remote_exception(sys.exc_info())
        return om_common.deserialize_remote_exception(
            data, exception.ALLOWED_REMOTE_EXMODS)

    def test_rebuilt_as_the_same_class_then_cleaned(self):
        for original in (
                exception.InvalidRequest(field='spec', reason='is bad'),
                exception.InstanceNotFound(instance='vm0'),
                exception.Conflict(instance='vm0', reason='is stopped'),
                exception.PeerUnreachable(host='hv2', reason='timeout'),
                exception.InternalError(method='list', host='h',
                                        reason='X: y'),
                exception.MftvmError('plain message')):
            remote = self.roundtrip(original)
            self.assertIsInstance(remote, type(original))
            self.assertIn('Traceback', str(remote))   # oslo.messaging's
            clean = exception.from_remote(remote)
            self.assertIs(type(original), type(clean))
            self.assertEqual(str(original), str(clean))
            self.assertEqual(original.kwargs, clean.kwargs)

    def test_not_allowed_module_is_a_remote_error(self):
        try:
            raise exception.Conflict(instance='vm0', reason='x')
        except Exception:
            data = om_common.serialize_remote_exception(sys.exc_info())
        remote = om_common.deserialize_remote_exception(data, [])
        self.assertIsInstance(remote, oslo_messaging.RemoteError)

    def test_message_is_one_line(self):
        exc = exception.InternalError(method='m', host='h',
                                      reason='a\nb\n')
        self.assertEqual('m failed on host h: a ...', str(exc))
        self.assertEqual('x', str(exception.MftvmError('\n x \n')))


class TransportTest(testtools.TestCase):

    def test_mask_url(self):
        self.assertEqual('rabbit://nova:***@10.0.0.5:5672/',
                         rpcapi.mask_url('rabbit://nova:s3cr3t@10.0.0.5:5672/'))
        self.assertEqual(
            'rabbit://a:***@h1:5672,b:***@h2:5672/vh',
            rpcapi.mask_url('rabbit://a:p1@h1:5672,b:p,2/x@h2:5672/vh'))
        self.assertEqual('rabbit://h:5672/', rpcapi.mask_url('rabbit://h:5672/'))
        self.assertEqual('<none>', rpcapi.mask_url(None))

    def test_malformed_urls_never_show_the_password(self):
        for url in ('rabbit://u:s3cr3tpw@host:notaport/',
                    'nosuchdriver://u:s3cr3tpw@host/',
                    'u:s3cr3tpw@host',
                    'rabbit://u:s3cr3tpw@[::1/'):
            exc = self.assertRaises(exception.TransportError,
                                    rpcapi.get_transport, CONF, url)
            self.assertNotIn('s3cr3tpw', str(exc))
            self.assertIn('***', str(exc))
            self.assertNotIn('\n', str(exc))

    def test_client_refuses_an_empty_host_before_sending(self):
        transport = rpcapi.get_transport(CONF, 'fake://')
        self.addCleanup(transport.cleanup)
        api = rpcapi.AgentAPI(transport)
        for host in ('', None, 3):
            exc = self.assertRaises(exception.InvalidRequest, api.list, {},
                                    host)
            self.assertEqual('host', exc.kwargs['field'])


class ServiceOverFakeTransportTest(testtools.TestCase):
    """A real AgentService with a fake manager, over fake://."""

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        CONF.set_override('host', HOST, group='agent')
        CONF.set_override('monitor_interval', 0.1, group='agent')
        cls.transport = rpcapi.get_transport(CONF, 'fake://')
        cls.manager = FakeManager()
        cls.service = service.AgentService(
            CONF, manager_factory=lambda: cls.manager,
            transport=cls.transport)
        cls.service.start()
        cls.api = rpcapi.AgentAPI(cls.transport, timeout=5)

    @classmethod
    def tearDownClass(cls) -> None:
        cls.service.stop()
        cls.service.wait()
        cls.transport.cleanup()
        CONF.clear_override('host', group='agent')
        CONF.clear_override('monitor_interval', group='agent')
        super().tearDownClass()

    def setUp(self) -> None:
        super().setUp()
        with self.manager.lock:
            self.manager.calls.clear()
        # the server logs refusals; keep them out of the test output
        self.useFixture(fixtures.FakeLogger(level=logging.INFO))

    def test_every_call_reaches_its_manager_method(self):
        api, ctxt = self.api, {'request_id': 'req-1'}
        self.assertEqual(
            {'method': 'prepare_secondary', 'instance': 'vm0'},
            api.prepare_secondary(ctxt, HOST, 'vm0', GOOD_SPEC,
                                  GOOD_OPTIONS, 'hv1'))
        api.protect(ctxt, HOST, 'vm0', GOOD_SPEC, {'epoch_ms': 50},
                    secondary_host='hv2')
        api.protect(ctxt, HOST, 'vm1', GuestSpec(name='vm1'),
                    ProtectionOptions())
        api.unprotect(ctxt, HOST, 'vm0')
        api.failover(ctxt, HOST, 'vm0')
        api.stop_instance(ctxt, HOST, 'vm0')
        api.disk_settled(ctxt, HOST, 'vm0')
        self.assertEqual({'method': 'status', 'instance': 'vm0'},
                         api.status(ctxt, HOST, 'vm0'))
        self.assertEqual([{'instance': 'vm0', 'role': 'primary'}],
                         api.list(ctxt, HOST))
        self.assertEqual(
            [('prepare_secondary', 'vm0', spec(), options(), 'hv1'),
             ('protect', 'vm0', spec(), ProtectionOptions(epoch_ms=50),
              'hv2'),
             ('protect', 'vm1', GuestSpec(name='vm1'), ProtectionOptions(),
              None),
             ('unprotect', 'vm0'), ('failover', 'vm0'),
             ('stop_instance', 'vm0'), ('disk_settled', 'vm0'),
             ('status', 'vm0'), ('list',)],
            self.manager.calls)
        self.assertTrue(self.manager.started)

    def test_refusals_arrive_as_themselves(self):
        exc = self.assertRaises(
            exception.InvalidRequest, self.api.protect, {}, HOST, 'vm0',
            GOOD_SPEC, {'epoch_ms': 5})
        self.assertEqual('options.epoch_ms', exc.kwargs['field'])
        self.assertRaises(exception.Conflict, self.api.protect, {}, HOST,
                          'busy', BARE_SPEC, {})
        self.assertRaises(exception.InstanceNotFound, self.api.status, {},
                          HOST, 'ghost')
        self.assertEqual([('protect', 'busy', GuestSpec(name='vm0'),
                           ProtectionOptions(), None),
                          ('status', 'ghost')], self.manager.calls)

    def test_manager_crash_is_an_error_and_the_agent_answers_on(self):
        exc = self.assertRaises(exception.MftvmError, self.api.failover,
                                {}, HOST, 'crash')
        self.assertIsInstance(exc, exception.InternalError)
        self.assertIn('RuntimeError: disk on fire', str(exc))
        self.assertEqual(1, len(self.api.list({}, HOST)))

    def test_unsupported_version_and_method(self):
        target = oslo_messaging.Target(exchange=rpcapi.EXCHANGE,
                                       topic=rpcapi.TOPIC, server=HOST,
                                       version='2.0')
        client = oslo_messaging.get_rpc_client(self.transport, target,
                                               timeout=5)
        exc = self.assertRaises(oslo_messaging.UnsupportedVersion,
                                client.call, {}, 'list')
        self.assertIn('2.0', str(exc))
        self.assertRaises(oslo_messaging.NoSuchMethod,
                          client.prepare(version='1.0').call, {}, 'reboot')
        self.assertEqual(1, len(self.api.list({}, HOST)))
        self.assertEqual([('list',)], self.manager.calls)

    def test_no_answer_is_peer_unreachable(self):
        api = rpcapi.AgentAPI(self.transport, timeout=0.2)
        exc = self.assertRaises(exception.PeerUnreachable, api.status, {},
                                'hv-nobody', 'vm0')
        self.assertIn('hv-nobody', str(exc))

    def test_periodic_runs_and_survives_errors(self):
        start = self.manager.periodic_calls
        self.manager.periodic_error = RuntimeError('periodic boom')
        try:
            with self.manager.periodic_ran:
                self.manager.periodic_ran.wait_for(
                    lambda: self.manager.periodic_calls >= start + 3,
                    timeout=5)
        finally:
            self.manager.periodic_error = None
        self.assertGreaterEqual(self.manager.periodic_calls, start + 3)


class ServiceLifecycleTest(testtools.TestCase):

    def test_stop_order_and_idempotence(self):
        CONF.set_override('host', 'hv-life', group='agent')
        self.addCleanup(CONF.clear_override, 'host', group='agent')
        transport = rpcapi.get_transport(CONF, 'fake://')
        self.addCleanup(transport.cleanup)
        events: list[str] = []
        manager = FakeManager()
        manager.start = lambda: events.append('start')
        manager.stop = lambda: events.append('stop')
        svc = service.AgentService(CONF, manager_factory=lambda: manager,
                                   transport=transport)
        svc.start()
        svc.stop()
        svc.stop()
        svc.wait()
        self.assertEqual(['start', 'stop'], events)


class CliTest(testtools.TestCase):
    """``mftvm`` remote mode arguments (no broker needed)."""

    def mftvm(self, *args: str, env: dict[str, str] | None = None,
              ) -> subprocess.CompletedProcess:
        full_env = dict(os.environ, **(env or {}))
        full_env.pop('MFTVM_TRANSPORT_URL', None)
        return subprocess.run(
            [sys.executable, '-m', 'mftvm_openstack.cmd.mftvm', *args],
            capture_output=True, text=True, env=full_env, timeout=60)

    def test_remote_mode_errors_are_one_line(self):
        result = self.mftvm('list')
        self.assertEqual(1, result.returncode)
        self.assertEqual('mftvm: error: list needs --host HOST (and '
                         '--transport-url or $MFTVM_TRANSPORT_URL)\n',
                         result.stderr)
        result = self.mftvm('status', 'vm0', '--host', 'hv1')
        self.assertEqual(1, result.returncode)
        self.assertIn('--host needs a broker', result.stderr)
        result = self.mftvm('--transport-url', 'rabbit://u:pw9x@h:x/',
                            '--host', 'hv1', 'stop', 'vm0')
        self.assertEqual(1, result.returncode)
        self.assertEqual(1, len(result.stderr.splitlines()), result.stderr)
        self.assertNotIn('pw9x', result.stderr)

    def test_broker_from_a_config_file_or_the_environment(self):
        # A password in argv is anyone's (ps): the URL may come from a
        # config file only its owner reads, or from the environment.
        tmp = self.useFixture(fixtures.TempDir()).path
        with_url = os.path.join(tmp, 'mftvm.conf')
        with open(with_url, 'w') as f:
            f.write('[DEFAULT]\ntransport_url = rabbit://u:pwcf9@127.0.0.1:1/\n')
        without = os.path.join(tmp, 'other.conf')
        with open(without, 'w') as f:
            f.write('[DEFAULT]\ndebug = true\n')
        refused = ('mftvm: error: messaging transport '
                   'rabbit://u:***@127.0.0.1:1/: cannot reach')
        result = self.mftvm('--config-file', with_url, '--host', 'hv1',
                            'stop', 'vm0')
        self.assertEqual(1, result.returncode)
        self.assertThat(result.stderr, StartsWith(refused))
        self.assertNotIn('pwcf9', result.stderr)
        result = self.mftvm('--config-file', without, '--host', 'hv1',
                            'stop', 'vm0')
        self.assertEqual(1, result.returncode)
        self.assertEqual('mftvm: error: --host needs a broker: no '
                         f'transport_url in [DEFAULT] of {without}\n',
                         result.stderr)
        env = dict(os.environ,
                   MFTVM_TRANSPORT_URL='rabbit://u:pwcf9@127.0.0.1:1/')
        result = subprocess.run(
            [sys.executable, '-m', 'mftvm_openstack.cmd.mftvm', '--host',
             'hv1', 'stop', 'vm0'], capture_output=True, text=True,
            env=env, timeout=60)
        self.assertEqual(1, result.returncode)
        self.assertThat(result.stderr, StartsWith(refused))
        help_text = self.mftvm('--help').stdout
        self.assertIn('--config-file', help_text)
        self.assertIn('visible to all users', ' '.join(help_text.split()))

    def test_standalone_import_needs_no_messaging(self):
        code = ('import sys, mftvm_openstack.cmd.mftvm as m; '
                'm.build_parser(); '
                'print(json.dumps("oslo_messaging" in sys.modules))')
        out = subprocess.run([sys.executable, '-c', 'import json; ' + code],
                             capture_output=True, text=True, check=True)
        self.assertFalse(json.loads(out.stdout))


if __name__ == '__main__':
    unittest.main()
