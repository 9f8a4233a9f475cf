"""The FT compute driver in Nova's in-process functional harness.

Real API, conductor, scheduler and Placement; fake-libvirt computes
(Nova's ``ServersTestBase``) running ``compute_driver =
mftvm.FTLibvirtDriver``, loaded by Nova itself through the
``nova.virt.mftvm`` shim (:mod:`mftvm_openstack.nova.virt_shim`). The
agents are a :class:`FakeAgentAPI` that records calls, installed as the
driver's ``agent_api_factory``. Every test here refuses
``select_destinations`` called from this package
(:class:`NoSchedulerFromCompute`): under cells v2's superconductor a
compute cannot reach nova-scheduler.
"""

from __future__ import annotations

import doctest
import os
import traceback
from typing import Any

import fixtures
import nova.context as nova_context
import nova.objects.instance as instance_obj
import testtools
from nova.scheduler.client import query as scheduler_query
from nova.tests.functional.libvirt import base
from oslo_utils import importutils
from testtools import content

import mftvm_openstack
from mftvm_openstack.agent import exception as agent_exception
from mftvm_openstack.nova import driver, steering, virt_shim
from tests.nova.test_extra_specs import api_paste_config

_PACKAGE_DIR = mftvm_openstack.__path__[0]
FILE_BACKED_MIB = 8192
FLAVOR = {'memory_mb': 512, 'vcpu': 1, 'disk': 1, 'ephemeral': 0}
USAGE = {'VCPU': 1, 'MEMORY_MB': 512, 'DISK_GB': 1}
NO_USAGE = {'VCPU': 0, 'MEMORY_MB': 0, 'DISK_GB': 0}


class FakeAgentAPI:
    """Stands for :class:`mftvm_openstack.agent.rpcapi.AgentAPI`.

    ``calls`` records ``(method, host, kwargs)``; ``fail[method]`` is an
    exception to raise instead of answering. ``list``, which the
    driver's watcher polls, is not recorded: it answers nothing running,
    or raises ``PeerUnreachable`` for the hosts in ``silent``.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.fail: dict[str, Exception] = {}
        self.silent: set[str] = set()

    def list(self, ctxt: Any, host: str) -> list[dict[str, Any]]:
        if host in self.silent:
            raise agent_exception.PeerUnreachable(host=host,
                                                  reason='no answer')
        return []

    def _call(self, method: str, host: str, **kwargs: Any) -> dict:
        self.calls.append((method, host, kwargs))
        if method in self.fail:
            raise self.fail[method]
        return {'instance': kwargs.get('instance'), 'state': 'ok'}

    def protect(self, ctxt: Any, host: str, instance: str, spec: dict,
                options: dict, secondary_host: Any = None) -> dict:
        return self._call('protect', host, instance=instance, spec=spec,
                          options=options, secondary_host=secondary_host)

    def stop_instance(self, ctxt: Any, host: str, instance: str) -> dict:
        return self._call('stop_instance', host, instance=instance)

    def disk_settled(self, ctxt: Any, host: str, instance: str) -> dict:
        return self._call('disk_settled', host, instance=instance)

    def of(self, method: str) -> list[tuple[str, dict[str, Any]]]:
        return [(h, kw) for m, h, kw in self.calls if m == method]


class NoSchedulerFromCompute(fixtures.Fixture):
    """``select_destinations`` raises when this package calls it.

    ``calls`` counts the calls that went through (the conductor's, for
    the primaries); ``from_here`` the refused ones.
    """

    def _setUp(self) -> None:
        self.calls = 0
        self.from_here = 0
        original = scheduler_query.SchedulerQueryClient.select_destinations

        def guarded(client: Any, *args: Any, **kwargs: Any) -> Any:
            if any(frame.filename.startswith(_PACKAGE_DIR)
                   for frame in traceback.extract_stack()):
                self.from_here += 1
                raise AssertionError('select_destinations called from '
                                     'mftvm_openstack (a compute)')
            self.calls += 1
            return original(client, *args, **kwargs)

        self.useFixture(fixtures.MonkeyPatch(
            'nova.scheduler.client.query.SchedulerQueryClient.'
            'select_destinations', guarded))



class TestDocstrings(testtools.TestCase):

    def test_driver_doctests(self) -> None:
        result = doctest.testmod(driver)
        self.assertGreater(result.attempted, 0)
        self.assertEqual(0, result.failed)


class TestVirtShim(testtools.TestCase):
    """``nova.virt.mftvm``, as Nova 34 imports ``compute_driver``."""

    def test_shim_is_our_driver(self) -> None:
        self.assertIn(virt_shim.ensure_importable(),
                      ('installed', 'source tree'))
        # idempotent, and what load_compute_driver imports
        virt_shim.ensure_importable()
        import nova.virt

        self.assertEqual(len(set(nova.virt.__path__)),
                         len(nova.virt.__path__))
        self.assertIs(driver.FTLibvirtDriver, importutils.import_class(
            'nova.virt.' + virt_shim.COMPUTE_DRIVER))

    def test_source_shim_never_shadows_nova(self) -> None:
        # no __init__.py above the shim: the source tree's nova/ is at
        # most a namespace portion, and Nova's regular package wins
        tree = os.path.dirname(os.path.dirname(virt_shim.SOURCE_DIR))
        self.assertTrue(os.path.isfile(
            os.path.join(virt_shim.SOURCE_DIR, 'mftvm', '__init__.py')))
        for parent in ('nova', os.path.join('nova', 'virt')):
            self.assertFalse(os.path.exists(
                os.path.join(tree, parent, '__init__.py')), parent)
        import nova

        self.assertNotIn(os.path.join(tree, 'nova'), list(nova.__path__))


class FTDriverTestBase(base.ServersTestBase):
    """Computes ``HOSTS`` running FTLibvirtDriver, agents faked."""

    microversion = 'latest'
    ADMIN_API = True
    HOSTS: tuple[str, ...] = ('host1', 'host2')
    #: hosts started without ``[libvirt] file_backed_memory``: not
    #: FT-capable
    NOT_FT_HOSTS: tuple[str, ...] = ()

    def setUp(self) -> None:
        self.shim = virt_shim.ensure_importable()
        # no compute may call nova-scheduler (superconductor): every
        # secondary here is chosen through Placement
        self.no_scheduler = self.useFixture(NoSchedulerFromCompute())
        super().setUp()
        self.addDetail('shim', content.text_content(self.shim))
        self.agent = FakeAgentAPI()
        self.useFixture(fixtures.MonkeyPatch(
            'mftvm_openstack.nova.driver.FTDriverMixin.agent_api_factory',
            staticmethod(lambda: self.agent)))
        # FT-capable hosts (mftvm_openstack.nova.steering): the agent
        # reads guest RAM from the domain's memory file
        self.flags(file_backed_memory=FILE_BACKED_MIB, group='libvirt')
        self.flags(ram_allocation_ratio=1.0, reserved_host_memory_mb=0)
        for host in self.HOSTS:
            if host in self.NOT_FT_HOSTS:
                # read by the driver in init_host: this host only
                self.flags(file_backed_memory=0, group='libvirt')
            self.start_compute(host)
            self.flags(file_backed_memory=FILE_BACKED_MIB, group='libvirt')
        self.flavor = self._create_flavor(name='mftvm.plain', **FLAVOR)
        # as doc/admin.rst has operators make it: steered to FT hosts
        self.ft_flavor = self._create_flavor(
            name='mftvm.ft', extra_spec={'ft:enabled': 'true',
                                      'ft:epoch_ms': '100',
                                      steering.FLAVOR_TRAIT_SPEC:
                                          'required'}, **FLAVOR)

    def _setup_services(self) -> None:
        self.flags(api_paste_config=api_paste_config(), group='wsgi')
        super()._setup_services()

    def _setup_compute_service(self) -> None:
        self.flags(compute_driver=virt_shim.COMPUTE_DRIVER)

    # -- helpers ---------------------------------------------------------

    def _boot(self, flavor: str, metadata: dict | None = None,
              expected_state: str = 'ACTIVE') -> dict:
        body = self._build_server(flavor_id=flavor, networks='none')
        if metadata is not None:
            body['metadata'] = metadata
        server = self.api.post_server({'server': body})
        return self._wait_for_state_change(server, expected_state)

    def _sysmeta(self, server: dict) -> dict:
        ctxt = nova_context.get_admin_context()
        instance = instance_obj.Instance.get_by_uuid(
            ctxt, server['id'], expected_attrs=['system_metadata'])
        return dict(instance.system_metadata)

    def _usages(self) -> dict[str, dict]:
        return {host: self._get_provider_usages(self.compute_rp_uuids[host])
                for host in self.HOSTS}

    def _other(self, host: str) -> str:
        (other,) = [h for h in self.HOSTS if h != host]
        return other


class TestFTDriver(FTDriverTestBase):

    def test_nova_loaded_our_driver(self) -> None:
        for host in self.HOSTS:
            self.assertIsInstance(self.computes[host].driver,
                                  driver.FTLibvirtDriver)
        self.assertIs(driver.FTLibvirtDriver, importutils.import_class(
            'nova.virt.' + virt_shim.COMPUTE_DRIVER))

    def _assert_protected(self, server: dict, options: dict) -> str:
        primary = server['OS-EXT-SRV-ATTR:host']
        secondary = self._other(primary)
        sysmeta = self._sysmeta(server)
        self.assertEqual(secondary, sysmeta[driver.SECONDARY_HOST])
        self.assertEqual(driver.secondary_consumer(server['id']),
                         sysmeta[driver.SECONDARY_CONSUMER])
        self.assertEqual('protected', sysmeta[driver.STATUS])
        self.assertEqual('protected', server['metadata'][driver.STATUS])
        # resources held on both hosts, the secondary's by its consumer
        self.assertEqual({primary: USAGE, secondary: USAGE}, self._usages())
        allocs = self._get_allocations_by_server_uuid(
            driver.secondary_consumer(server['id']))
        self.assertEqual([self.compute_rp_uuids[secondary]], list(allocs))
        self.assertEqual(
            [(primary, {'instance': server['id'],
                        'spec': {'name': server['id'],
                                 'domain': self._domain(server),
                                 'memory_mib': 512, 'smp': 1},
                        'options': options, 'secondary_host': secondary})],
            self.agent.of('protect'))
        return primary

    def _domain(self, server: dict) -> str:
        return server['OS-EXT-SRV-ATTR:instance_name']

    def test_metadata_ft_protected_then_delete_releases(self) -> None:
        server = self._boot(self.flavor, {'ft': 'true'})
        primary = self._assert_protected(server, {})
        secondary = self._other(primary)

        self._delete_server(server)
        self.assertEqual({primary: NO_USAGE, secondary: NO_USAGE},
                         self._usages())
        self.assertEqual(
            [(primary, {'instance': server['id']}),
             (secondary, {'instance': server['id']})],
            self.agent.of('stop_instance'))

    def test_flavor_ft_protected(self) -> None:
        server = self._boot(self.ft_flavor)
        self._assert_protected(server, {'epoch_ms': 100})

    def test_non_ft_server_untouched(self) -> None:
        server = self._boot(self.flavor, {'ft': 'false'})
        primary = server['OS-EXT-SRV-ATTR:host']
        self.assertEqual({primary: USAGE, self._other(primary): NO_USAGE},
                         self._usages())
        self.assertNotIn(driver.STATUS, server['metadata'])
        self.assertNotIn(driver.SECONDARY_HOST, self._sysmeta(server))
        self._delete_server(server)
        self.assertEqual([], self.agent.calls)

    def test_agent_failures_never_fail_nova(self) -> None:
        self.agent.fail['protect'] = agent_exception.PeerUnreachable(
            host='host?', reason='no answer')
        self.agent.fail['stop_instance'] = agent_exception.InstanceNotFound(
            instance='x')
        server = self._boot(self.ft_flavor)
        primary = server['OS-EXT-SRV-ATTR:host']
        secondary = self._other(primary)
        status = self._sysmeta(server)[driver.STATUS]
        self.assertTrue(status.startswith('error: protect failed: the '
                                          'agent on host host?'), status)
        self.assertEqual(status, server['metadata'][driver.STATUS])
        # the secondary stays held: the agent may be using it
        self.assertEqual({primary: USAGE, secondary: USAGE}, self._usages())

        self._delete_server(server)
        self.assertEqual({primary: NO_USAGE, secondary: NO_USAGE},
                         self._usages())
        self.assertEqual([primary, secondary],
                         [h for h, _ in self.agent.of('stop_instance')])

    def test_invalid_ft_request_aborts_build(self) -> None:
        # stored through a microversion that does not validate
        self.admin_api.microversion = '2.85'
        self.admin_api.post_extra_spec(
            self.ft_flavor, {'extra_specs': {'ft:epoch_ms': '5'}})
        server = self._boot(self.ft_flavor, expected_state='ERROR')
        self.assertIn("flavor extra spec 'ft:epoch_ms'",
                      server['fault']['message'])
        self.assertEqual([], self.agent.calls)
        self.assertEqual({h: NO_USAGE for h in self.HOSTS}, self._usages())

    def test_bad_values_stored_through_horizon_abort_the_build(self) -> None:
        # Horizon's "Update Metadata" saves through openstacksdk, whose
        # flavor speaks 2.61: nova-api stores any value there. A word
        # where a number belongs, or a mistyped key from the dialog's
        # Custom field, must not leave a server running unprotected.
        self.admin_api.microversion = '2.61'
        for name, specs, says in (
                ('mftvm.banana', {'ft:enabled': 'true',
                                  'ft:epoch_ms': 'banana'},
                 "flavor extra spec 'ft:epoch_ms': 'banana' is not an "
                 "integer number of milliseconds"),
                ('mftvm.typo', {'ft:enable': 'true'},
                 "flavor extra spec 'ft:enable': is not a known extra "
                 "spec")):
            flavor = self._create_flavor(name=name, extra_spec=specs,
                                         **FLAVOR)
            self.assertEqual(
                specs, self.admin_api.get_flavor(flavor)['extra_specs'],
                'stored unchecked')
            server = self._boot(flavor, expected_state='ERROR')
            self.assertIn(says, server['fault']['message'], name)
            self.assertIn('aborted', server['fault']['message'], name)
            self.assertEqual([], self.agent.calls, name)
            self.assertEqual({h: NO_USAGE for h in self.HOSTS},
                             self._usages(), name)
            self._delete_server(server)


class TestFTDriverOneHost(FTDriverTestBase):
    """No host for a secondary: ACTIVE, unprotected, and saying so."""

    HOSTS = ('host1',)

    def test_no_secondary_host_degraded(self) -> None:
        server = self._boot(self.flavor, {'ft': 'true'})
        status = server['metadata'][driver.STATUS]
        self.assertTrue(status.startswith(
            'unprotected: no secondary host ('), status)
        sysmeta = self._sysmeta(server)
        self.assertEqual(status, sysmeta[driver.STATUS])
        self.assertNotIn(driver.SECONDARY_HOST, sysmeta)
        self.assertEqual({'host1': USAGE}, self._usages())
        self.assertEqual([], self.agent.calls)
        self._delete_server(server)
        self.assertEqual({'host1': NO_USAGE}, self._usages())
        self.assertEqual([], self.agent.calls)
