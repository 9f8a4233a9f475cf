"""The contract's payload records, and that producers and consumers agree.

The agent's RPC checks (hostile values for each field) are in
test_agent_rpc; here: what the records themselves promise, and a walk
over the consumers' sources for status keys the contract does not have.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import importlib.util
import io
import unittest
from importlib import metadata
from unittest import mock

from mftvm_openstack.cmd import mftvm
from mftvm_openstack.contract import plugins
from mftvm_openstack.contract.record import ContractError
from mftvm_openstack.contract.spec import (
    FailoverResult,
    GuestSpec,
    HostForward,
    PreparedSecondary,
    ProtectionOptions,
)
from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import InstanceStatus
from mftvm_openstack.ft import vm
from mftvm_openstack.local.operations import LocalGuestStatus


class GuestSpecTest(unittest.TestCase):

    def test_the_engine_uses_the_contracts_spec(self):
        self.assertIs(GuestSpec, vm.GuestSpec)
        self.assertIs(HostForward, vm.HostForward)

    def test_json_round_trip(self):
        spec = GuestSpec(name='vm0', kernel='/k', initrd='/i', disk='/d',
                         forwards=(HostForward('127.0.0.1', 8080, 80),),
                         disk_size=1 << 30)
        self.assertEqual(spec, GuestSpec.from_json(spec.to_json()))
        self.assertEqual('tcp:127.0.0.1:8080-:80', spec.forwards[0].qemu())

    def test_from_json_wants_something_to_run(self):
        with self.assertRaises(ContractError) as ctx:
            GuestSpec.from_json({'name': 'vm0', 'disk': '/d'})
        self.assertIn('libvirt domain', str(ctx.exception))
        self.assertEqual('instance-1', GuestSpec.from_json(
            {'name': 'vm0', 'domain': 'instance-1'}).domain)

    def test_qemu_argv_of_a_checked_spec_has_one_hostfwd_per_forward(self):
        spec = GuestSpec.from_json({
            'name': 'vm0', 'kernel': '/k', 'initrd': '/i', 'disk': '/d',
            'forwards': [{'host_addr': '127.0.0.1', 'host_port': 2222,
                          'guest_port': 22}]})
        argv = vm.qemu_argv(spec, vm.Paths('/run/x'), '/dev/shm/r')
        netdev = argv[argv.index('-netdev') + 1]
        self.assertEqual('user,id=n0,ipv6=off,'
                         'hostfwd=tcp:127.0.0.1:2222-:22', netdev)

    def test_errors_name_the_field(self):
        with self.assertRaises(ContractError) as ctx:
            GuestSpec.from_dict({'name': 'vm0', 'forwards': [
                {'host_addr': '1.2.3.4', 'host_port': 70000,
                 'guest_port': 1}]}, 'spec')
        self.assertEqual('spec.forwards[0].host_port', ctx.exception.field)
        self.assertIn('1 to 65535', ctx.exception.reason)


class ProtectionOptionsTest(unittest.TestCase):

    def test_left_out_is_not_null(self):
        self.assertEqual({}, ProtectionOptions().to_dict())
        opts = ProtectionOptions(epoch_ms=50, start_delay=0.0)
        self.assertEqual({'epoch_ms': 50, 'start_delay': 0.0},
                         opts.to_dict())
        self.assertEqual(opts, ProtectionOptions.from_dict(opts.to_dict()))
        with self.assertRaises(ContractError) as ctx:
            ProtectionOptions.from_dict({'epoch_ms': None})
        self.assertIn('leave it out', str(ctx.exception))

    def test_start_delay_is_finite_and_not_negative(self):
        for bad in (-0.001, float('inf'), float('nan'), '1', True):
            self.assertRaises(ContractError, ProtectionOptions.from_dict,
                              {'start_delay': bad})
        self.assertEqual(1e6, ProtectionOptions.from_dict(
            {'start_delay': 1e6}).start_delay)

    def test_a_plugin_registered_later_is_accepted(self):
        # choices are read when a request is checked, not at import
        self.assertRaises(ContractError, ProtectionOptions.from_dict,
                          {'disk_sync': 'later-sync', 'tracker': 'later'})
        real = metadata.entry_points

        def entry_points(group):
            found = list(real(group=group))
            name = {plugins.DISK_SYNC_NAMESPACE: 'later-sync',
                    plugins.TRACKER_NAMESPACE: 'later'}.get(group)
            if name:
                found.append(metadata.EntryPoint(name, 'x:Y', group))
            return found
        with mock.patch.object(plugins.metadata, 'entry_points',
                               entry_points):
            opts = ProtectionOptions.from_dict(
                {'disk_sync': 'later-sync', 'tracker': 'later'})
        self.assertEqual(('later-sync', 'later'),
                         (opts.disk_sync, opts.tracker))


class RepliesTest(unittest.TestCase):
    """What one agent answers another (or the CLI) is checked too."""

    def test_prepared_secondary(self):
        ready = PreparedSecondary(host='hv2', data_address='tcp:10.0.0.2:4711')
        self.assertEqual(ready, PreparedSecondary.from_dict(ready.to_dict()))
        for bad in ('unix:/run/x.sock', 'tcp:10.0.0.2:4711,x',
                    'tcp:10.0.0.2', 'tcp:h:4711\n', '', 4711, None):
            self.assertRaises(ContractError, PreparedSecondary.from_dict,
                              {'host': 'hv2', 'data_address': bad})

    def test_failover_result(self):
        result = FailoverResult(instance='vm0', host='hv2', runs_on='hv2',
                                failover_ms=350.0)
        self.assertEqual(result, FailoverResult.from_dict(result.to_dict()))
        self.assertRaises(ContractError, FailoverResult.from_dict,
                          {'instance': 'vm0', 'accepted': True})


def _status_keys_read(source: str) -> set[str]:
    """String keys a module reads from something named like a status:
    ``st['k']``, ``st.get('k')``, ``status.get("k")``..."""
    names = {'st', 'status', 'side', 'sec', 'prim', 'info', 'entry',
             'live', 'before_kill', 'data'}
    keys = set()
    for node in ast.walk(ast.parse(source)):
        target = key = None
        if isinstance(node, ast.Subscript) and \
                isinstance(node.slice, ast.Constant):
            target, key = node.value, node.slice.value
        elif isinstance(node, ast.Call) and \
                isinstance(node.func, ast.Attribute) and \
                node.func.attr == 'get' and node.args and \
                isinstance(node.args[0], ast.Constant):
            target, key = node.func.value, node.args[0].value
        if isinstance(target, ast.Name) and target.id in names and \
                isinstance(key, str):
            keys.add(key)
    return keys


class ProducersAndConsumersAgreeTest(unittest.TestCase):
    """A consumer that reads a status key the contract does not define
    reads None for ever (the agent's 'pause_p50_ms' did): fail here."""

    CONSUMERS = ('mftvm_openstack.agent.manager',
                 'mftvm_openstack.cmd.mftvm',
                 'mftvm_openstack.local.demo',
                 'mftvm_openstack.local.operations',
                 'mftvm_openstack.nova.handoff',
                 'mftvm_openstack.nova.driver')

    def test_every_status_key_read_is_a_field(self):
        # read as text: importing Nova's modules here would patch threads
        fields = {f.name for f in dataclasses.fields(InstanceStatus)}
        for name in self.CONSUMERS:
            with self.subTest(module=name):
                spec = importlib.util.find_spec(name)
                assert spec is not None and spec.origin is not None
                with open(spec.origin) as f:
                    read = _status_keys_read(f.read())
                self.assertEqual(set(), read - fields)

    def test_the_cli_lists_fields_of_the_status(self):
        fields = {f.name for f in dataclasses.fields(InstanceStatus)}
        self.assertLessEqual(set(mftvm.LIST_FIELDS), fields)

    def test_the_walk_would_see_the_old_bug(self):
        self.assertEqual({'pause_p50_ms'}, _status_keys_read(
            "out = {k: st[k] for k in keys}\nst.get('pause_p50_ms')"))


class CliTest(unittest.TestCase):
    """The local CLI shows what the contract says."""

    def test_plugin_names_in_the_help_come_from_the_entry_points(self):
        real = metadata.entry_points

        def entry_points(group):
            found = list(real(group=group))
            if group == plugins.DISK_SYNC_NAMESPACE:
                found.append(metadata.EntryPoint('third-party-sync', 'x:Y',
                                                 group))
            return found
        out = io.StringIO()
        with mock.patch.object(plugins.metadata, 'entry_points',
                               entry_points), \
                contextlib.redirect_stdout(out), \
                self.assertRaises(SystemExit):
            mftvm.build_parser().parse_args(['protect', '--help'])
        text = ' '.join(out.getvalue().split())
        self.assertIn('third-party-sync', text)
        for name in plugins.tracker_choices():
            self.assertIn(name, text)

    def test_local_status_shows_both_sides_and_children(self):
        st = LocalGuestStatus(
            name='vm0',
            primary=InstanceStatus(role=Role.PRIMARY,
                                   state=State.PROTECTED, host_pid=10,
                                   alive=True, epochs=5, pause_ms_p50=7.5),
            secondary=None, child_pids={'primary': (11, 12)})
        self.assertEqual(st, LocalGuestStatus.from_dict(st.to_dict()))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            mftvm.print_status(st)
        text = out.getvalue()
        self.assertIn('state=protected host-pid=10 (running)', text)
        self.assertIn('children: [11, 12]', text)
        self.assertIn('pause p50=7.5ms', text)
        self.assertIn('secondary side: not started', text)
