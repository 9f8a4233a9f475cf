"""Hostile values for every input field the RPC tests do not cover.

test_agent_rpc sends hostile values for each field of the RPC spec and
options through the agent's endpoint; here: the same garbage against
every field of every record that comes off a socket (the data stream's
HELLO and READY, the control socket's request), the spec's paths with
``..``, the data addresses a control request or an agent names, the
``--nic`` text the CLI parses, and the CLI's arguments, each of which
must end in one line that names it, never a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
import tempfile
import typing
import unittest
from typing import Any

from mftvm_openstack.cmd import mftvm
from mftvm_openstack.contract.control import ControlReply, ControlRequest
from mftvm_openstack.contract.hello import (
    PROTOCOL_VERSION,
    Hello,
    NbdTargetInfo,
    Ready,
)
from mftvm_openstack.contract.record import ContractError, Record
from mftvm_openstack.contract.spec import (
    GuestSpec,
    HostForward,
    PreparedSecondary,
    ProtectionOptions,
)
from mftvm_openstack.ft.transport import DataAddress
from mftvm_openstack.local import operations

#: what a hostile peer may send in place of any field
GARBAGE: tuple[Any, ...] = (
    {'nested': {'deeper': [1, {'x': None}]}}, [['/a']], [], {},
    float('nan'), float('inf'), float('-inf'), 1.5, -1, 10 ** 100,
    -(10 ** 100), True, 'x' * 100_000, '/a\x00b', '../../etc/shadow',
    '1-:2,guestfwd=tcp:10.0.2.9:9-cmd:touch x', 'a\nb',
)

GOOD_HELLO = {'version': PROTOCOL_VERSION, 'qemu_pid': 4242,
              'host_pid': 4243, 'boot_id': '0f3c2a9e-1111-4d2b-9c1e-'
              '5b7d2f0a9e11', 'pair_id': 'a1b2c3d4e5f6',
              'disk_size': 1 << 30, 'domain_xml': '<domain/>'}
GOOD_TARGET = {'socket': '/var/lib/mftvm/vm0/secondary/nbd.sock',
               'host': '10.0.0.12', 'port': 10809, 'export': 'disk0'}
GOOD_REQUEST = {'op': 'protect', 'secondary': 'tcp:10.0.0.12:4711',
                'pair_id': 'pair-2'}

#: fields whose text is checked after the record, by its one consumer:
#: domain_xml by ft.domain_policy (test_domain_policy), a control
#: request's secondary by DataAddress.parse (below); and the kernel
#: command line, free text by design (one argument of QEMU's, checked
#: for control characters and length in test_agent_rpc)
CHECKED_LATER = {(Hello, 'domain_xml'), (ControlRequest, 'secondary'),
                 (GuestSpec, 'append')}


def refused(cls: type[Record], data: dict[str, Any]) -> bool:
    try:
        cls.from_dict(json.loads(json.dumps(data)))
    except ContractError:
        return True
    return False


class EveryFieldTest(unittest.TestCase):
    """For each field: each piece of garbage is refused, by name."""

    def sweep(self, cls: type[Record], good: dict[str, Any]) -> None:
        cls.from_dict(good)      # the good one passes
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            for bad in GARBAGE:
                if (cls, f.name) in CHECKED_LATER and isinstance(bad, str):
                    continue
                number = typing.get_args(hints[f.name]) or (hints[f.name],)
                if float in number and isinstance(bad, (int, float)) and \
                        not isinstance(bad, bool) and bad >= 0:
                    continue    # start_delay: any finite wait is a wait
                if bad == [] and tuple in (
                        typing.get_origin(hints[f.name]),
                        *map(typing.get_origin, number)):
                    continue    # no forwards (no more disks, ...)
                with self.subTest(field=f.name, value=repr(bad)[:40]):
                    data = dict(good, **{f.name: bad})
                    with self.assertRaises(ContractError) as ctx:
                        cls.from_dict(data)
                    self.assertIn(f.name, ctx.exception.field,
                                  str(ctx.exception))
                    self.assertLess(len(str(ctx.exception)), 400)
        for bad in ({'unknown': 1}, {'__class__': 'x'}):
            self.assertTrue(refused(cls, dict(good, **bad)))
        for bad in (None, [], 'x', 5):
            self.assertRaises(ContractError, cls.from_dict, bad)

    def test_hello_from_the_wire(self):
        self.sweep(Hello, GOOD_HELLO)

    def test_hello_pids_and_boot_id(self):
        for key in ('qemu_pid', 'host_pid'):
            for bad in (0, -1, 1 << 22 + 1, 1 << 40):
                self.assertTrue(refused(Hello, dict(GOOD_HELLO,
                                                    **{key: bad})), bad)
        for bad in ('', 'x' * 65, 'a b', 'a/b', 'é'):
            self.assertTrue(refused(Hello, dict(GOOD_HELLO, boot_id=bad)))
        self.assertTrue(refused(Hello, dict(GOOD_HELLO, domain_xml='x' * (
            (1 << 20) + 1))))

    def test_ready_and_its_nbd_target(self):
        self.sweep(NbdTargetInfo, GOOD_TARGET)
        for bad in ('relative.sock', '/' + 'a' * 107, '/a\nb'):
            self.assertTrue(refused(NbdTargetInfo, {'socket': bad}), bad)
        for bad in ('10.0.0.1,server.type=unix', 'a b', 'h\n', ''):
            self.assertTrue(refused(NbdTargetInfo, {'host': bad}), bad)
        for bad in ('../disk', 'a b', ''):
            self.assertTrue(refused(NbdTargetInfo, {'export': bad}), bad)
        self.assertTrue(refused(Ready, {'target': 'nbd://evil'}))
        self.assertTrue(refused(Ready, {'target': dict(GOOD_TARGET,
                                                       extra=1)}))

    def test_control_request(self):
        self.sweep(ControlRequest, GOOD_REQUEST)
        for op in ('rm', 'STATUS', '', 'status\n'):
            self.assertTrue(refused(ControlRequest, {'op': op}), op)
        self.assertTrue(refused(ControlRequest, dict(
            GOOD_REQUEST, secondary='tcp:h:1' + 'x' * 5000)))
        self.assertTrue(refused(ControlReply, {'ok': 'yes'}))

    def test_spec_options_forwards_and_prepared_secondary(self):
        self.sweep(GuestSpec, {'name': 'vm0', 'kernel': '/k',
                               'initrd': '/i', 'disk': '/d'})
        self.sweep(HostForward, {'host_addr': '127.0.0.1',
                                 'host_port': 8080, 'guest_port': 80})
        self.sweep(ProtectionOptions, {'epoch_ms': 100})
        self.sweep(PreparedSecondary, {'host': 'hv2',
                                       'data_address': 'tcp:10.0.0.2:4711'})

    def test_spec_paths_never_climb(self):
        for key in ('kernel', 'initrd', 'disk'):
            for bad in ('/var/lib/nova/../../etc/shadow', '/..', '/a/..',
                        '/a/../b', 'a/b', './a', '', '/a,b'):
                if bad == '':
                    continue    # empty: none (the domain is the hardware)
                with self.subTest(key=key, path=bad):
                    self.assertTrue(refused(GuestSpec, {'name': 'vm0',
                                                        key: bad}))
            # dots inside a name are a name
            GuestSpec.from_dict({'name': 'vm0', key: '/a/..b/c.../d..'})


class DataAddressTest(unittest.TestCase):
    """A control request's ``secondary`` and an agent's data address."""

    def test_hostile_addresses_are_refused(self):
        for bad in ('nowhere', 'unix:', 'unix:/a\nb', 'unix:\x00',
                    'unix:/' + 'a' * 200, 'tcp:host', 'tcp::1',
                    'tcp:h:99999', 'tcp:h:-1', 'tcp:a b:1', 'tcp:h\n:1',
                    'tcp:h,x=y:1', 'tcp:h:1' + '0' * 5000, 'exec:touch x',
                    'tcp:' + 'h' * 300 + ':1'):
            with self.subTest(address=bad[:40]):
                with self.assertRaisesRegex(ValueError,
                                            'bad data-plane address'):
                    DataAddress.parse(bad)

    def test_good_addresses(self):
        self.assertEqual(DataAddress(host='10.0.0.2', port=4711),
                         DataAddress.parse('tcp:10.0.0.2:4711'))
        self.assertEqual(DataAddress(host='[fd00::2]', port=0),
                         DataAddress.parse('tcp:[fd00::2]:0'))
        self.assertEqual(DataAddress(path='/run/x.sock'),
                         DataAddress.parse('unix:/run/x.sock'))


class NicTextTest(unittest.TestCase):
    """``--nic`` is parsed into checked forwards before any port is
    bound (a port out of range made socket.bind raise OverflowError, a
    huge number int() a ValueError: tracebacks)."""

    def test_issue_11_guestfwd_example(self):
        with self.assertRaisesRegex(operations.UserError,
                                    "cannot parse 'guestfwd="):
            operations.parse_nic('user,hostfwd=tcp:127.0.0.1:1-:2,'
                                 'guestfwd=tcp:10.0.2.9:9-cmd:touch x')

    def test_hostile_forwards(self):
        for bad, words in (
                ('hostfwd=tcp:127.0.0.1:99999-:80', 'host_port'),
                ('hostfwd=tcp:127.0.0.1:0-:80', 'host_port'),
                ('hostfwd=tcp:127.0.0.1:80-:0', 'guest_port'),
                ('hostfwd=tcp:999.0.0.1:80-:80', 'host_addr'),
                ('hostfwd=tcp:127.0.0.1:8' + '0' * 5000 + '-:80',
                 'cannot parse'),
                ('hostfwd=tcp:127.0.0.1:80-:80-cmd', 'cannot parse'),
                ('hostfwd=udp:127.0.0.1:80-:80', 'cannot parse')):
            with self.subTest(nic=bad[:40]):
                with self.assertRaises(operations.UserError) as ctx:
                    operations.parse_nic(f'user,{bad}')
                self.assertIn(words, str(ctx.exception))
                self.assertLess(len(str(ctx.exception)), 400)


class CliArgumentsTest(unittest.TestCase):
    """Each bad argument: a non-zero exit and one error line naming it;
    no traceback, and nothing started (each fails before any guest)."""

    def setUp(self) -> None:
        self.state_dir = tempfile.mkdtemp(prefix='mftvm-unit-')
        self.addCleanup(shutil.rmtree, self.state_dir, True)

    def run_cli(self, *argv: str, parse_only: bool = False,
                ) -> tuple[Any, list[str]]:
        """``mftvm ARGV``'s exit code and error lines; ``parse_only``:
        only its argument parser (a command that would run a guest if
        the argument got through)."""
        err = io.StringIO()
        with contextlib.redirect_stderr(err), \
                contextlib.redirect_stdout(io.StringIO()):
            try:
                if parse_only:
                    mftvm.build_parser().parse_args(argv)
                    code: Any = 0
                else:
                    code = mftvm.main(['--state-dir', self.state_dir,
                                       *argv])
            except SystemExit as exc:
                code = exc.code
        text = err.getvalue()
        self.assertNotIn('Traceback', text)
        return code, [line for line in text.splitlines()
                      if 'error' in line]

    def assertOneLine(self, argv: tuple[str, ...], *words: str,
                      parse_only: bool = False) -> None:
        code, errors = self.run_cli(*argv, parse_only=parse_only)
        self.assertNotEqual(0, code, argv)
        self.assertEqual(1, len(errors), errors)
        for word in words:
            self.assertIn(word, errors[0])

    def test_names(self):
        for command in ('status', 'stop', 'failover'):
            for bad in ('../../etc', '/etc', '..', 'vm\n0', 'vm 0',
                        'x' * 300, '-'):
                with self.subTest(command=command, name=bad[:20]):
                    self.assertOneLine((command, '--', bad), 'guest name')
        self.assertOneLine(('protect', '../x', '--kernel', '/k',
                            '--initrd', '/i', '--disk', '/d'),
                           'guest name')

    def test_host(self):
        for bad in ('h 1', 'h1\nx', '-h', 'h/1', 'x' * 300):
            with self.subTest(host=bad[:20]):
                self.assertOneLine(('status', 'vm0', '--host', bad),
                                   '--host')
                self.assertOneLine(('--host', bad, 'list'), '--host')

    def test_waits(self):
        for bad in ('nan', 'inf', '-1', '-inf', '1e400', 'soon', '0'):
            with self.subTest(timeout=bad):
                self.assertOneLine(('--timeout', bad, 'list', '--host',
                                    'h1'), '--timeout')
                self.assertOneLine(('status', 'vm0', '--host', 'h1',
                                    '--timeout', bad), '--timeout')
        for bad in ('nan', 'inf', '-1', 'later'):
            with self.subTest(kill_after=bad):
                self.assertOneLine(('demo', '--kill-after', bad),
                                   '--kill-after', parse_only=True)

    def test_numbers(self):
        for flag in ('--memory', '--smp', '--epoch-ms', '--idle-epoch-ms'):
            for bad in ('nan', '1.5', 'x', '9' * 5000):
                with self.subTest(flag=flag, value=bad[:10]):
                    self.assertOneLine(('protect', 'vm0', '--kernel', '/k',
                                        '--initrd', '/i', '--disk', '/d',
                                        flag, bad), flag)


if __name__ == '__main__':
    unittest.main()
