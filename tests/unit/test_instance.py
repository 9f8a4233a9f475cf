"""The instance process's parts, without QEMU: the control server, the
status publisher, the commands each side accepts, the lease keeper and
the hang watchdog."""

import asyncio
import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from unittest import mock

from mftvm_openstack import fencing
from mftvm_openstack.contract.control import (
    ControlOp,
    ControlReply,
    ControlRequest,
)
from mftvm_openstack.contract.hello import PROTOCOL_VERSION, Hello
from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import InstanceStatus
from mftvm_openstack.ft import pair, vm
from mftvm_openstack.ft.monitor import Monitor
from mftvm_openstack.instance import client, secondary
from mftvm_openstack.instance import control as control_server
from mftvm_openstack.instance import guest as guest_mod
from mftvm_openstack.instance.config import boot_id
from mftvm_openstack.instance.control import ControlServer
from mftvm_openstack.instance.lease import (
    ECHO_MARGIN,
    RETRY_AFTER_FAILURE,
    LeaseKeeper,
)
from mftvm_openstack.instance.primary import PrimarySide
from mftvm_openstack.instance.secondary import (
    SecondarySide,
    pid_exists,
    stop_old_primary,
    wait_pid_gone,
)
from mftvm_openstack.instance.status import StatusPublisher
from mftvm_openstack.instance.watchdog import watch_hang
from mftvm_openstack.waiting import wait_until
from tests.unit.fake_clock import settle
from tests.unit.test_fencing import ScriptedFence, unreachable_for


def guest_dir(test):
    tmp = tempfile.TemporaryDirectory()
    test.addCleanup(tmp.cleanup)
    spec = vm.GuestSpec(name=f'unit-{os.getpid()}', kernel='/k', initrd='/i',
                        disk='/d', disk_size=1 << 20)
    with open(os.path.join(tmp.name, 'guest.json'), 'w') as f:
        json.dump({'spec': spec.to_json(),
                   'options': {'epoch_ms': 200, 'tls': True}}, f)
    return tmp.name


def _ask_as_user(uid, path, request):
    """Send ``request`` to a unix socket from a child running as ``uid``:
    b'answer:' and what the server answered, or b'error:' and why not."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        try:
            os.close(read_end)
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(path)
                try:
                    s.sendall(request)
                    answer = s.recv(4096)
                except (BrokenPipeError, ConnectionResetError):
                    # closed before the request was sent, or with it unread
                    answer = b''
                os.write(write_end, b'answer:' + answer)
        except BaseException as exc:
            os.write(write_end, f'error:{exc!r}'.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, 'rb') as f:
        answer = f.read()
    os.waitpid(pid, 0)
    return answer


class ControlServerTest(unittest.IsolatedAsyncioTestCase):

    async def asyncSetUp(self):
        self.requests = []

        async def handler(request):
            self.requests.append(request)
            if request.secondary == 'raise-value':
                raise ValueError('bad data-plane address')
            if request.secondary == 'raise-bug':
                raise KeyError('bug')
            return ControlReply(ok=True)
        self.server = ControlServer('/nonexistent/control.sock', handler)

    async def test_a_request_that_fits_reaches_the_handler(self):
        reply = await self.server.answer(
            b'{"op": "protect", "secondary": "unix:/x", "pair_id": "p-2"}\n')
        self.assertEqual(ControlReply(ok=True), reply)
        self.assertEqual([ControlRequest(op=ControlOp.PROTECT,
                                         secondary='unix:/x',
                                         pair_id='p-2')], self.requests)

    async def test_a_bad_request_gets_the_contracts_message(self):
        for line, error in (
                (b'{"op": "reboot"}', 'request.op: must be one of'),
                (b'{"op": "status", "force": true}',
                 'request.force: is not a field'),
                (b'{"op": "protect", "pair_id": "a b"}',
                 'request.pair_id: must match'),
                (b'["status"]', 'must be a JSON object'),
                (b'', 'request.op: is required'),
                (b'{"op": ', 'Expecting value'),
                (b'\xff\n', 'decode')):
            with self.subTest(line=line):
                reply = await self.server.answer(line)
                self.assertFalse(reply.ok)
                self.assertIn(error, reply.error)
        self.assertEqual([], self.requests)

    async def test_a_failing_handler_is_an_answer_not_a_traceback(self):
        reply = await self.server.answer(
            b'{"op": "protect", "secondary": "raise-value"}')
        self.assertEqual(ControlReply(ok=False,
                                      error='bad data-plane address'), reply)
        with self.assertLogs('mftvm_openstack.instance.control', 'ERROR'):
            reply = await self.server.answer(
                b'{"op": "protect", "secondary": "raise-bug"}')
        self.assertFalse(reply.ok)
        self.assertIn('internal error', reply.error)

    async def test_over_the_socket(self):
        gdir = guest_dir(self)
        os.mkdir(os.path.join(gdir, 'primary'))
        server = ControlServer(
            os.path.join(gdir, 'primary', 'control.sock'),
            self.server.handler)
        await server.start()
        self.addCleanup(server.close)
        reply = await asyncio.to_thread(
            client.control, gdir, 'primary',
            ControlRequest(op=ControlOp.STOP), 5)
        self.assertEqual(ControlReply(ok=True), reply)
        # A request the client's types cannot even express, written raw.
        reader, writer = await asyncio.open_unix_connection(
            os.path.join(gdir, 'primary', 'control.sock'))
        writer.write(b'{"op": "bogus"}\n')
        await writer.drain()
        reply = ControlReply.from_dict(json.loads(await reader.readline()))
        writer.close()
        self.assertFalse(reply.ok)
        self.assertIn('op: must be one of', reply.error)

    async def test_the_socket_is_private(self):
        gdir = guest_dir(self)
        os.mkdir(os.path.join(gdir, 'primary'))
        path = os.path.join(gdir, 'primary', 'control.sock')
        server = ControlServer(path, self.server.handler)
        old = os.umask(0)
        try:
            await server.start()
        finally:
            os.umask(old)
        self.addCleanup(server.close)
        self.assertEqual(0o600, stat.S_IMODE(os.stat(path).st_mode))

    async def _open_server(self):
        gdir = guest_dir(self)
        os.mkdir(os.path.join(gdir, 'primary'))
        path = os.path.join(gdir, 'primary', 'control.sock')
        server = ControlServer(path, self.server.handler)
        await server.start()
        self.addCleanup(server.close)
        return gdir, path

    async def test_a_peer_of_another_user_is_refused(self):
        gdir, path = await self._open_server()
        # Loosen the modes as a careless operator might: the peer check
        # is what still stands.
        os.chmod(gdir, 0o755)
        os.chmod(os.path.dirname(path), 0o755)
        os.chmod(path, 0o666)
        with self.assertLogs('mftvm_openstack.instance.control',
                             'WARNING') as logs:
            answer = await asyncio.to_thread(_ask_as_user, 65534, path,
                                             b'{"op": "stop"}\n')
        self.assertEqual(b'answer:', answer)  # connected, then closed
        self.assertIn('peer uid 65534 may not steer', logs.output[0])
        self.assertEqual([], self.requests)
        # root still steers it
        reply = await asyncio.to_thread(
            client.control, gdir, 'primary',
            ControlRequest(op=ControlOp.STOP), 5)
        self.assertEqual(ControlReply(ok=True), reply)

    async def test_connections_beyond_the_bound_are_closed(self):
        gdir, path = await self._open_server()
        idle = []
        for _ in range(control_server.MAX_CLIENTS):
            idle.append(await asyncio.open_unix_connection(path))
            self.addCleanup(idle[-1][1].close)
        await asyncio.sleep(0.05)
        with self.assertLogs('mftvm_openstack.instance.control',
                             'WARNING') as logs:
            reader, writer = await asyncio.open_unix_connection(path)
            self.assertEqual(b'', await reader.read())
            writer.close()
        self.assertIn('control clients at once', logs.output[0])
        # A served client leaving frees its place.
        idle[0][1].write(b'{"op": "stop"}\n')
        self.assertTrue((await idle[0][0].readline()).startswith(b'{'))
        await asyncio.sleep(0.05)
        reply = await asyncio.to_thread(
            client.control, gdir, 'primary',
            ControlRequest(op=ControlOp.STOP), 5)
        self.assertEqual(ControlReply(ok=True), reply)

    async def test_the_client_reads_a_bounded_reply(self):
        gdir = guest_dir(self)
        os.mkdir(os.path.join(gdir, 'primary'))

        async def endless(reader, writer):
            await reader.readline()
            with contextlib.suppress(ConnectionError):
                for _ in range(client.MAX_REPLY // 65536 + 2):
                    writer.write(b'x' * 65536)
                    await writer.drain()
            writer.close()
        server = await asyncio.start_unix_server(
            endless, os.path.join(gdir, 'primary', 'control.sock'))
        self.addCleanup(server.close)
        with self.assertRaisesRegex(ConnectionError, 'a reply over'):
            await asyncio.to_thread(client.control, gdir, 'primary',
                                    ControlRequest(op=ControlOp.STOP), 5)


class StatusPublisherTest(unittest.TestCase):

    def test_publishes_the_status_record_and_the_pauses(self):
        root = guest_dir(self)
        pauses = []
        status = InstanceStatus(role=Role.PRIMARY, state=State.PROTECTED,
                                epochs=3, pause_ms_p50=12.5)
        publisher = StatusPublisher(root, lambda: status, lambda: pauses)
        publisher.publish()
        with open(os.path.join(root, 'status.json')) as f:
            data = json.load(f)
        self.assertEqual(status, InstanceStatus.from_dict(data))
        self.assertEqual(12.5, data['pause_ms_p50'])
        self.assertFalse(os.path.exists(os.path.join(root, 'pauses.json')))
        pauses.extend([10.0, 15.0])
        publisher.publish()
        with open(os.path.join(root, 'pauses.json')) as f:
            self.assertEqual([10.0, 15.0], json.load(f))
        # nothing left behind by the atomic writes
        self.assertEqual(['guest.json', 'pauses.json', 'status.json'],
                         sorted(os.listdir(root)))


class FakeProcess:
    pid = 4242

    def __init__(self):
        self.running = True

    async def wait(self):
        while self.running:
            await asyncio.sleep(0.001)
        return 0

    async def kill(self):
        self.running = False

    def last_log_line(self):
        return ''


class HungMonitor:
    async def execute(self, command, **args):
        await asyncio.get_running_loop().create_future()   # never


class SideCommandTest(unittest.IsolatedAsyncioTestCase):

    async def ask(self, side, **request):
        reply = await side.control.answer(json.dumps(request).encode())
        return reply

    async def test_the_primary_accepts_what_its_state_allows(self):
        side = PrimarySide(guest_dir(self))
        side.start(side.machine)
        self.addCleanup(side.machine.post, pair.Stop())
        reply = await self.ask(side, op='status')
        self.assertTrue(reply.ok)
        self.assertEqual((Role.PRIMARY, State.STARTING),
                         (reply.status.role, reply.status.state))
        self.assertEqual(os.getpid(), reply.status.host_pid)
        reply = await self.ask(side, op='protect', secondary='unix:/x')
        self.assertEqual('the guest is starting here; it can be protected '
                         'only while it runs unprotected', reply.error)
        reply = await self.ask(side, op='failover')
        self.assertEqual('the guest is not protected: there is no '
                         'secondary to fail over to', reply.error)
        reply = await self.ask(side, op='unprotect')
        self.assertEqual('the guest is not protected', reply.error)
        side.machine.post(pair.GuestUp(FakeProcess(), HungMonitor()))
        await settle()
        self.assertEqual(State.UNPROTECTED, side.machine.state)
        reply = await self.ask(side, op='protect', secondary='nowhere')
        self.assertFalse(reply.ok)
        self.assertIn('bad data-plane address', reply.error)
        reply = await self.ask(side, op='stop')
        self.assertTrue(reply.ok)
        await asyncio.wait_for(side.machine.finished.wait(), 5)
        self.assertEqual(State.STOPPED, side.status().state)

    async def test_a_status_says_since_when_its_state_holds(self):
        side = PrimarySide(guest_dir(self))
        side.start(side.machine)
        self.addCleanup(side.machine.post, pair.Stop())
        # A clock the test moves (time.time is patched for everyone:
        # whatever else reads it, e.g. a log record, reads the same).
        clock = [100.0]

        def status_at(when: float):
            clock[0] = when
            return side.status()
        with mock.patch('mftvm_openstack.instance.side.time.time',
                        side_effect=lambda: clock[0]):
            first = status_at(100.0)
            again = status_at(101.0)
            side.machine.post(pair.GuestUp(FakeProcess(), HungMonitor()))
            await settle()
            changed = status_at(102.0)
            later = status_at(103.0)
        self.assertEqual((State.STARTING, 100.0, 101.0),
                         (first.state, first.state_since, again.updated))
        self.assertEqual(100.0, again.state_since)
        self.assertEqual((State.UNPROTECTED, 102.0),
                         (changed.state, changed.state_since))
        self.assertEqual((102.0, 103.0), (later.state_since, later.updated))

    async def test_the_secondary_fails_over_only_from_standby(self):
        side = SecondarySide(guest_dir(self))
        side.start(side.machine)
        side.machine.post(pair.Listening())
        await settle()
        reply = await self.ask(side, op='status')
        self.assertEqual((Role.SECONDARY, State.WAITING_FOR_PRIMARY),
                         (reply.status.role, reply.status.state))
        reply = await self.ask(side, op='failover')
        self.assertEqual('this side is not a standby secondary', reply.error)
        reply = await self.ask(side, op='protect', secondary='unix:/x')
        self.assertIn('the guest is waiting-for-primary here', reply.error)
        reply = await self.ask(side, op='stop')
        self.assertTrue(reply.ok)
        await asyncio.wait_for(side.machine.finished.wait(), 5)
        self.assertEqual(State.STOPPED, side.machine.state)


class FakeFence:
    def __init__(self, lease, expires_in):
        self.lease = lease
        self.expires_at = time.monotonic() + expires_in

    def deadline(self, margin):
        return self.expires_at - margin

    def renew(self):
        raise ConnectionError('backend gone')

    def reclaim(self):
        return False       # another host holds it now


class LeaseKeeperTest(unittest.IsolatedAsyncioTestCase):

    async def test_a_lock_file_needs_no_keeping(self):
        lost = []
        keeper = LeaseKeeper(FakeFence(float('inf'), 0), 'g',
                             lambda: float('-inf'), lost.append)
        await asyncio.wait_for(keeper.run(), 1)
        self.assertEqual([], lost)

    async def test_the_secondarys_word_keeps_the_guest_running(self):
        now = time.monotonic()
        keeper = LeaseKeeper(FakeFence(3, -1), 'g', lambda: now + 5,
                             lambda why: None)
        self.assertEqual(now + 5 - ECHO_MARGIN, keeper.may_run_until())
        keeper.vouched = lambda: float('-inf')
        self.assertLess(keeper.may_run_until(), now)

    async def test_a_lease_taken_by_another_host_is_reported(self):
        lost = []
        keeper = LeaseKeeper(FakeFence(3, -1), 'g', lambda: float('-inf'),
                             lost.append)
        with self.assertLogs('mftvm_openstack.instance.lease', 'WARNING'):
            await asyncio.wait_for(keeper.run(), 2)
        self.assertEqual(1, len(lost))
        self.assertIn(lost[0], ('another host owns the guest',
                                'ownership could not be renewed within its '
                                'lease, and the secondary no longer vouches '
                                'for us'))


class RecordedStop:
    """A stand-in for the renewer's stop event: records each wait, and is
    set after ``waits`` of them."""

    def __init__(self, waits):
        self.waits, self.left = [], waits

    def is_set(self):
        return self.left <= 0

    def wait(self, seconds):
        self.waits.append(seconds)
        self.left -= 1


class FlakyFence(FakeFence):
    """Renewals answer from a script (an exception fails that one)."""

    def __init__(self, lease, expires_in, *answers):
        super().__init__(lease, expires_in)
        self.answers = list(answers)

    def renew(self):
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer


class LeaseRenewalTest(unittest.TestCase):
    """A renewal that fails is tried again at once while the lease still
    holds at the backend: with a 3 s lease renewed every 0.75 s, waiting
    a whole interval after one slow answer (1 s budget) left no second
    try before the guest had to stop."""

    def renew(self, fence, waits):
        stop = RecordedStop(waits)
        keeper = LeaseKeeper(fence, 'g', lambda: float('-inf'),
                             lambda why: None)
        with self.assertLogs('mftvm_openstack.instance.lease', 'WARNING') \
                as logs:
            keeper._renew_forever(stop)
        return stop.waits, logs.output

    def test_a_failed_renewal_is_retried_at_once(self):
        gone = ConnectionError('no answer')
        waits, logs = self.renew(FlakyFence(3, 3, gone, gone, None, None), 4)
        self.assertEqual([RETRY_AFTER_FAILURE, RETRY_AFTER_FAILURE, 0.75,
                          0.75], waits)
        # one line when renewals start failing, one when they work again
        self.assertEqual(2, len(logs), logs)
        self.assertIn('cannot renew ownership of g', logs[0])
        self.assertIn('ownership of g renewed again', logs[1])

    def test_after_the_lease_lapsed_it_is_reclaimed_at_the_usual_pace(self):
        gone = ConnectionError('no answer')
        fence = FlakyFence(3, -1, gone, gone)
        fence.reclaim = lambda: None       # the backend does not answer
        waits, logs = self.renew(fence, 2)
        self.assertEqual([0.75, 0.75], waits)
        self.assertEqual(1, len(logs), logs)


class WatchdogTest(unittest.IsolatedAsyncioTestCase):

    async def test_a_hung_qemu_is_reported_and_killed(self):
        process, hung = FakeProcess(), []
        with self.assertLogs('mftvm_openstack.instance.watchdog', 'ERROR'):
            await asyncio.wait_for(
                watch_hang(process, HungMonitor(), 0.005, hung.append), 2)
        self.assertEqual(['QEMU hung (no answer for 0s)'], hung)
        self.assertFalse(process.running)


class PidAliveTest(unittest.TestCase):
    """One notion of a process that runs, for the agent, the CLI and the
    secondary's wait for its old primary."""

    def test_running_zombie_reaped_and_garbage(self):
        # a command name with ") Z " in it cannot fool the state field
        proc = subprocess.Popen(
            ['x) Z y', '-c', 'import sys; sys.stdin.read()'],
            executable=sys.executable, stdin=subprocess.PIPE)
        self.addCleanup(proc.kill)
        self.assertTrue(client.pid_alive(proc.pid))
        self.assertFalse(secondary.pid_exited(proc.pid))
        proc.stdin.close()
        # a zombie (exited, not reaped yet) runs no more
        self.assertTrue(wait_until(lambda: secondary.pid_exited(proc.pid),
                                   timeout=10))
        self.assertFalse(client.pid_alive(proc.pid))
        proc.wait()
        self.assertFalse(client.pid_alive(proc.pid))
        for bad in (0, -1, None, 'x', True, 1.5):
            self.assertFalse(client.pid_alive(bad), bad)
        self.assertIs(client.pid_exited, secondary.pid_exited)


class WaitPidGoneTest(unittest.IsolatedAsyncioTestCase):

    def fake_qemu(self, name):
        """A process that looks like the QEMU of guest ``name``."""
        proc = subprocess.Popen(
            ['qemu-system-x86_64', '-c', 'import time; time.sleep(60)',
             '-name', name], executable=sys.executable)
        self.addCleanup(proc.kill)
        self.addCleanup(proc.wait)
        return proc

    async def test_an_old_primary_that_runs_on_is_stopped(self):
        # Its host is frozen (SIGSTOP), not dead: its QEMU runs on, and
        # once the secondary owns the guest it must not.
        proc = self.fake_qemu('g1')
        await stop_old_primary(proc.pid, 'g1', 5)
        self.assertEqual(-signal.SIGKILL, proc.wait(5))

    async def test_a_process_that_reused_the_pid_is_left_alone(self):
        proc = self.fake_qemu('other')
        await stop_old_primary(proc.pid, 'g1', 0.05)
        self.assertIsNone(proc.poll())

    async def test_waits_for_the_process_to_be_gone(self):
        proc = subprocess.Popen(['true'])
        proc.wait()
        self.assertTrue(await wait_pid_gone(proc.pid, 1))
        self.assertFalse(await wait_pid_gone(os.getpid(), 0.005))


class FakeOverlayStore:
    async def failover_layers(self, committed):
        return [(f'/replica/epoch-{committed}.qcow2', 'qcow2')]


class TakeoverSides:
    """A secondary side ready to take over (its replica faked), fencing
    with ``fence``; what it restores goes to ``self.restored``."""

    def side(self, fence):
        side = SecondarySide(guest_dir(self))
        side.secondary.hello = Hello(
            version=PROTOCOL_VERSION, qemu_pid=1, host_pid=2,
            boot_id='another machine', pair_id='pair-1', disk_size=1 << 20)
        side.store = FakeOverlayStore()
        side.replica = object()
        side.load_fence = lambda: fence
        self.restored = []

        async def restore(layers, hello):
            self.restored.append(layers)
            return 'the guest'
        side._restore = restore
        return side


class TakeoverFenceTest(TakeoverSides, unittest.IsolatedAsyncioTestCase):
    """The secondary's takeover keeps its replica until the fence is
    decided, however long the backend is away."""

    async def test_an_unreachable_backend_is_waited_for_not_given_up(self):
        fence = ScriptedFence()
        fence.answers = [unreachable_for(fence, 600, True)]
        side = self.side(fence)
        await asyncio.wait_for(side.activate(7), 5)
        self.assertEqual([[('/replica/epoch-7.qcow2', 'qcow2')]],
                         self.restored)
        self.assertIs(fence, side.fence)
        self.assertEqual('', side.secondary.error)

    async def test_the_status_says_it_waits_for_the_fence(self):
        gate = threading.Event()
        fence = ScriptedFence(
            lambda: gate.is_set() or fencing.FenceError('no route'))
        side = self.side(fence)
        task = asyncio.ensure_future(side.activate(7))
        self.addCleanup(gate.set)
        for _ in range(5000):
            if 'waiting for the fence' in side.status().error:
                break
            await asyncio.sleep(0.001)
        self.assertIn('waiting for the fence: no route', side.status().error)
        self.assertEqual([], self.restored)
        gate.set()
        await asyncio.wait_for(task, 5)
        self.assertEqual(1, len(self.restored))

    async def test_an_unanswered_mark_read_is_asked_again(self):
        fence = ScriptedFence(True)
        answers = [fencing.FenceError('timed out'), (True, '')]

        def replica_valid(pair_id):
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer
        fence.replica_valid = replica_valid
        side = self.side(fence)
        await asyncio.wait_for(side.activate(7), 5)
        self.assertEqual(1, len(self.restored))
        self.assertEqual(1, fence.released)

    async def test_a_stale_replica_is_not_resumed(self):
        fence = ScriptedFence(True)
        fence.stale = 'the primary went on unprotected'
        side = self.side(fence)
        with self.assertRaisesRegex(RuntimeError, 'stale'):
            await asyncio.wait_for(side.activate(7), 5)
        self.assertEqual([], self.restored)

    async def test_a_lock_held_on_is_a_live_primary(self):
        fence = ScriptedFence(False)
        side = self.side(fence)
        with self.assertRaisesRegex(RuntimeError, 'still holds'):
            await asyncio.wait_for(side.activate(7), 5)
        self.assertEqual([], self.restored)

    async def test_an_operator_stop_ends_the_wait(self):
        fence = ScriptedFence(fencing.FenceError('down'))
        side = self.side(fence)
        task = asyncio.ensure_future(side.activate(7))
        await asyncio.sleep(0.05)
        reply = await side.control.answer(json.dumps({'op': 'stop'}).encode())
        self.assertTrue(reply.ok)
        with self.assertRaisesRegex(RuntimeError, 'stopped'):
            await asyncio.wait_for(task, 5)
        self.assertEqual([], self.restored)


class RenewCountingFence(ScriptedFence):
    """Won at once, on the real clock, with a short lease; counts its
    renewals."""

    lease = 0.4
    _now = staticmethod(time.monotonic)

    def __init__(self):
        super().__init__(True)
        self.renewals = 0

    def _renew(self):
        self.renewals += 1
        return True


class LeaseDuringRestoreTest(TakeoverSides,
                             unittest.IsolatedAsyncioTestCase):
    """The fence a secondary wins is renewed from that moment: a restore
    that takes longer than a lease must not let it lapse (the restored
    guest would then be fenced, that is killed, by its own host)."""

    async def test_the_lease_is_renewed_while_the_guest_is_restored(self):
        fence = RenewCountingFence()
        side = self.side(fence)

        async def slow_restore(layers, hello):
            await asyncio.sleep(4 * fence.lease)
            self.restored.append(layers)
            return 'the guest'
        side._restore = slow_restore
        self.addCleanup(side.stop_keeping_lease)
        await asyncio.wait_for(side.activate(7), 10)
        self.assertEqual(1, len(self.restored))
        self.assertGreaterEqual(fence.renewals, 3)
        self.assertEqual('', side.lease_lost)
        self.assertGreater(fence.deadline(0), time.monotonic())


class SameMachineTakeoverTest(TakeoverSides,
                              unittest.IsolatedAsyncioTestCase):

    async def test_a_dead_primarys_zombie_qemu_is_not_waited_for(self):
        # A SIGKILLed primary's QEMU dies with it; whoever inherits the
        # zombie may reap it late, but it holds no port any more: the
        # takeover on the same machine must not wait for the reaping.
        zombie = subprocess.Popen(['true'])
        self.addCleanup(zombie.wait)
        await until_exited(zombie.pid)
        self.assertTrue(os.path.exists(f'/proc/{zombie.pid}'))
        side = self.side(ScriptedFence(True))
        side.secondary.hello = Hello(
            version=PROTOCOL_VERSION, qemu_pid=zombie.pid, host_pid=2,
            boot_id=boot_id(), pair_id='pair-1', disk_size=1 << 20)
        with mock.patch.object(secondary, 'PRIMARY_GONE_TIMEOUT', 3600):
            await asyncio.wait_for(side.activate(7), 10)
        self.assertEqual(1, len(self.restored))
        self.assertTrue(pid_exists(zombie.pid))     # still not reaped


async def until_exited(pid):
    for _ in range(5000):
        if secondary.pid_exited(pid):
            return
        await asyncio.sleep(0.001)
    raise AssertionError(f'{pid} did not exit')


class MarkStaleTest(unittest.IsolatedAsyncioTestCase):
    """The primary's protector marks the dropped replica stale only under
    the lease the backend confirms at that moment."""

    async def test_a_lease_gone_is_ownership_lost_not_retried(self):
        side = PrimarySide(guest_dir(self))
        fence = ScriptedFence(True)

        def mark_stale(pair_id, reason):
            raise fencing.FenceLost('the lock holds another token')
        fence.mark_stale = mark_stale
        side.fence = fence
        with self.assertRaises(pair.OwnershipLost):
            await asyncio.wait_for(
                side.protector.invalidate_replica('pair-1'), 5)

    async def test_no_answer_is_retried_until_it_lands(self):
        side = PrimarySide(guest_dir(self))
        fence = ScriptedFence(True)
        tries = []

        def mark_stale(pair_id, reason):
            tries.append(reason)
            if len(tries) < 3:
                raise fencing.FenceError('timed out')
        fence.mark_stale = mark_stale
        side.fence = fence
        with self.assertLogs('mftvm_openstack.instance.protection',
                             'WARNING'):
            await asyncio.wait_for(
                side.protector.invalidate_replica('pair-1'), 5)
        self.assertEqual(3, len(tries))


class _EventMonitor(Monitor):
    """A monitor whose events the test hands in."""

    async def execute(self, command, **arguments):
        raise NotImplementedError

    async def close(self):
        pass


class GuestPoweroffTest(unittest.IsolatedAsyncioTestCase):
    """After its QEMU exited: did the guest power itself off, or die?"""

    def event(self, guest, reason):
        return {'event': 'SHUTDOWN',
                'data': {'guest': guest, 'reason': reason}}

    async def test_a_poweroff_seen_before_the_exit(self):
        monitor = _EventMonitor()
        with monitor.events('SHUTDOWN') as shutdowns:
            monitor._dispatch(self.event(True, 'guest-shutdown'))
            self.assertTrue(await guest_mod.powered_off(shutdowns, 5))

    async def test_a_poweroff_passed_on_after_the_exit(self):
        # libvirt passes the event on from its own thread: it may come
        # after the pidfd said QEMU is gone
        monitor = _EventMonitor()
        with monitor.events('SHUTDOWN') as shutdowns:
            asyncio.get_running_loop().call_later(
                0.05, monitor._dispatch, self.event(True, 'guest-shutdown'))
            self.assertTrue(await guest_mod.powered_off(shutdowns, 5))

    async def test_anything_else_is_a_failure(self):
        monitor = _EventMonitor()
        with monitor.events('SHUTDOWN') as shutdowns:
            for guest, reason in ((False, 'host-signal'),
                                  (False, 'host-qmp-quit'),
                                  (True, 'guest-reset'),
                                  (True, 'guest-panic')):
                monitor._dispatch(self.event(guest, reason))
            self.assertFalse(await guest_mod.powered_off(shutdowns, 0.05))
        with monitor.events('SHUTDOWN') as shutdowns:   # no event at all
            self.assertFalse(await guest_mod.powered_off(shutdowns, 0.05))

    def test_doctests(self):
        import doctest
        self.assertEqual(0, doctest.testmod(guest_mod).failed)


class ProtectorDiskTest(unittest.IsolatedAsyncioTestCase):
    """A libvirt guest's disk node is asked anew at each protection."""

    async def test_hello_reads_the_disk_node_again(self):
        from mftvm_openstack.instance.guest import RunningGuest
        from mftvm_openstack.instance.protection import GuestProtector

        class Blocks(_EventMonitor):
            node = 'libvirt-2-format'

            async def execute(self, command, **arguments):
                assert command == 'query-block', command
                return [{'inserted': {'node-name': self.node, 'ro': False,
                                      'image': {'virtual-size': 1 << 30}}}]

        class Dom:
            def XMLDesc(self, flags=0):  # noqa: N802
                return '<domain/>'

        process = mock.Mock(pid=1)
        guest = RunningGuest(process, Blocks(), '/ram', 'libvirt-2-format',
                             1 << 30, domain=Dom())
        spec = vm.GuestSpec(name='g', memory_mib=128)
        protector = GuestProtector(spec, {}, vm.Paths('/nonexistent'),
                                   lambda: guest, lambda: None)
        await protector.hello('p1')
        self.assertEqual('libvirt-2-format', guest.disk_node)
        # a pivot onto a copy (see mftvm_openstack.nova.settle)
        guest.monitor.node = 'libvirt-5-format'
        hello = await protector.hello('p2')
        self.assertEqual('libvirt-5-format', guest.disk_node)
        self.assertEqual(1 << 30, hello.disk_size)
