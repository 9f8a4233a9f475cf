"""A standalone "host": the process that owns one side of a protected guest.

``mftvm protect`` starts two of these, one per role, as separate OS
processes, so killing one is a real fault::

    python -m mftvm_openstack.standalone.host secondary DIR
    python -m mftvm_openstack.standalone.host primary DIR

``DIR`` is the guest's state directory (``<state-dir>/<name>``); it holds
``guest.json`` (the spec and protection options), and one sub-directory
per role with that side's sockets, logs and ``status.json``.

Each host answers JSON-line commands on ``<role>/control.sock``:
``{"op": "status"}``, ``{"op": "failover"}``, ``{"op": "stop"}``.

Fencing on one machine is a lock file, ``owner.lock``: whoever runs the
guest holds it, and a secondary takes over only once it holds it. The
agent replaces it with a distributed lock (tooz) across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any, Optional

from mftvm_openstack.ft import disk as ft_disk
from mftvm_openstack.ft import epoch, pair, trackers, transport, vm
from mftvm_openstack.ft.monitor import QMPMonitor, quiet_lost_connections
from mftvm_openstack.ft.network import OutputBuffer
from mftvm_openstack.ft.transport import Kind

LOG = logging.getLogger('mftvm.host')


def load_guest(guest_dir: str) -> tuple[vm.GuestSpec, dict[str, Any]]:
    with open(os.path.join(guest_dir, 'guest.json')) as f:
        data = json.load(f)
    return vm.GuestSpec.from_json(data['spec']), data['options']


def write_json_atomic(path: str, data: Any) -> None:
    tmp = f'{path}.{os.getpid()}.tmp'
    with open(tmp, 'w') as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


class OwnerLock:
    """The standalone fence: one holder of ``owner.lock`` runs the guest.

    Beside the lock, ``replica.json`` says whether the secondary's replica
    may still take over. The holder writes it; a secondary reads it only
    once it holds the lock, so what it reads is the dead owner's last word.
    """

    def __init__(self, guest_dir: str) -> None:
        self.path = os.path.join(guest_dir, 'owner.lock')
        self.record_path = os.path.join(guest_dir, 'replica.json')
        self._fd: Optional[int] = None

    def set_replica_valid(self, valid: bool, reason: str = '') -> None:
        assert self._fd is not None, 'only the lock holder may write'
        write_json_atomic(self.record_path, {'valid': valid,
                                             'reason': reason})
        # Durable before any output that depends on it leaves.
        fd = os.open(self.record_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def replica_valid(self) -> tuple[bool, str]:
        try:
            with open(self.record_path) as f:
                data = json.load(f)
            return bool(data['valid']), str(data.get('reason', ''))
        except (OSError, ValueError, KeyError):
            return False, 'no valid replica record'

    def try_acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    async def acquire(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.try_acquire():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True


async def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        await asyncio.sleep(0.01)
    return False


class Host:
    """What both roles share: directories, status file, control socket."""

    role = ''

    def __init__(self, guest_dir: str) -> None:
        self.guest_dir = guest_dir
        self.spec, self.options = load_guest(guest_dir)
        self.paths = vm.Paths(os.path.join(guest_dir, self.role))
        os.makedirs(self.paths.root, exist_ok=True)
        self.lock = OwnerLock(guest_dir)
        self.machine: Optional[Any] = None
        self.qemu: Optional[vm.ChildProcess] = None
        self.monitor: Optional[QMPMonitor] = None
        self.phase = 'starting'
        self.error = ''
        self.disk_layers: list[tuple[str, str]] = []
        self.sync_window: list[float] = []
        self.done = asyncio.Event()

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = {'role': self.role, 'state': self.phase}
        if self.machine is not None:
            data.update(self.machine.status())
        if self.error:
            data['error'] = self.error
        if self.disk_layers:
            data['disk_layers'] = self.disk_layers
        if self.sync_window:
            data['sync_window'] = self.sync_window
        data['host_pid'] = os.getpid()
        data['qemu_pid'] = self.qemu.pid if self.qemu and \
            self.qemu.running else None
        data['updated'] = time.time()
        return data

    def publish_status(self) -> None:
        write_json_atomic(os.path.join(self.paths.root, 'status.json'),
                          self.status())
        if self.machine is not None and self.machine.stats.pauses_ms:
            write_json_atomic(os.path.join(self.paths.root, 'pauses.json'),
                              self.machine.stats.pauses_ms)

    async def _publish_status(self) -> None:
        while True:
            self.publish_status()
            await asyncio.sleep(0.25)

    async def _control(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            request = json.loads(line or b'{}')
            op = request.get('op') if isinstance(request, dict) else None
            if op == 'status':
                reply: dict[str, Any] = {'ok': True, 'status': self.status()}
            elif op in ('failover', 'stop'):
                reply = await self.command(op)
            else:
                reply = {'ok': False, 'error': f'unknown op {op!r}'}
        except Exception as exc:  # a bad client must not hurt the host
            reply = {'ok': False, 'error': str(exc)}
        with contextlib.suppress(Exception):
            writer.write(json.dumps(reply).encode() + b'\n')
            await writer.drain()
            writer.close()

    async def command(self, op: str) -> dict[str, Any]:
        raise NotImplementedError

    async def serve_control(self) -> None:
        path = os.path.join(self.paths.root, 'control.sock')
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        await asyncio.start_unix_server(self._control, path)
        asyncio.ensure_future(self._publish_status())

    async def watch_qemu(self, on_exit: Callable[[str], None]) -> None:
        assert self.qemu is not None
        code = await self.qemu.wait()
        on_exit(f'QEMU (pid {self.qemu.pid}) exited with status {code}')

    async def stop_qemu(self) -> None:
        if self.monitor is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.monitor.execute('quit'), 2)
            await self.monitor.close()
        if self.qemu is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.qemu.wait(), 3)
            await self.qemu.kill()


class PrimaryHost(Host):
    """Boots the guest, protects it, checkpoints it every epoch."""

    role = 'primary'

    async def command(self, op: str) -> dict[str, Any]:
        machine = self.machine
        if op == 'failover':
            if not isinstance(machine, pair.PrimaryPair) or \
                    machine.state != pair.State.PROTECTED:
                return {'ok': False, 'error': 'the guest is not protected: '
                        'there is no secondary to fail over to'}
            machine.post(pair.Stop(handover=True))
        elif machine is not None:
            machine.post(pair.Stop())
        else:
            self.done.set()
        return {'ok': True}

    async def run(self) -> int:
        if not self.lock.try_acquire():
            LOG.error('another process runs guest %s', self.spec.name)
            return 1
        await self.serve_control()
        self.disk_layers = [(self.spec.disk, self.spec.disk_format)]
        ram = vm.ram_path(self.spec.name, 'primary')
        fd = os.open(ram, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, self.spec.memory_bytes)
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.paths.qmp)
        self.qemu = await vm.ChildProcess.start(
            vm.qemu_argv(self.spec, self.paths, ram), self.paths.log)
        try:
            self.monitor = await QMPMonitor.connect(self.paths.qmp,
                                                    'primary-qemu')
        except Exception:
            await self.qemu.wait()
            self.error = f'QEMU failed to start: {self.qemu.last_log_line()}'
            LOG.error(self.error)
            self.phase = 'failed'
            return 1
        if self.options.get('start_delay'):
            self.phase = 'unprotected'
            await asyncio.sleep(self.options['start_delay'])
        self.phase = 'syncing'
        try:
            machine = await self.protect(ram)
        except Exception as exc:
            self.error = f'protection failed: {exc}'
            LOG.exception('protection failed')
            self.phase = 'failed'
            await self.stop_qemu()
            return 1
        self.phase = 'protected'
        watcher = asyncio.ensure_future(self.watch_qemu(
            lambda why: machine.post(pair.GuestExited(why))))
        await machine.run()
        watcher.cancel()
        self.phase = machine.state.value
        if machine.state != pair.State.FAILED:
            await self.stop_qemu()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ram)
        return 0

    async def protect(self, ram: str) -> pair.PrimaryPair:
        assert self.monitor is not None and self.qemu is not None
        opts = self.options
        addr = transport.DataAddress(path=os.path.join(
            self.guest_dir, 'secondary', 'data.sock'))
        deadline = time.monotonic() + 30
        while True:
            try:
                channel = await transport.Channel.connect(addr)
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        await channel.send_json(Kind.HELLO, {
            'qemu_pid': self.qemu.pid, 'host_pid': os.getpid()})
        reply = await channel.recv(timeout=60)
        if reply.kind != Kind.READY:
            raise RuntimeError(f'secondary refused: {reply.json()}')
        target = ft_disk.NbdTarget(**reply.json()['target'])

        async def heartbeat() -> None:
            while True:
                await channel.send(Kind.HEARTBEAT)
                await asyncio.sleep(0.2)
        beating = asyncio.ensure_future(heartbeat())
        try:
            sync = ft_disk.load_disk_sync(opts['disk_sync'], self.monitor)
            started = time.monotonic()
            await sync.start(target)
            # CLOCK_MONOTONIC is system-wide: tests compare it with their
            # own stamps of the guest's output.
            self.sync_window = [started, time.monotonic()]
            tracker = trackers.load_tracker(
                opts['tracker'], ram, self.spec.memory_bytes, self.qemu.pid)
            capturer = epoch.CheckpointCapturer(self.monitor, tracker,
                                                self.paths.root)
            await capturer.setup()
            output = OutputBuffer(self.paths.netout, self.paths.netin)
            await output.attach(self.monitor)
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
        async def invalidate_replica() -> None:
            self.lock.set_replica_valid(False, 'the primary went on '
                                        'unprotected')
        self.lock.set_replica_valid(True)
        machine = pair.PrimaryPair(
            capturer=capturer, disk=sync, output=output, channel=channel,
            monitor=self.monitor, clock=pair.RealClock(),
            epoch_ms=opts['epoch_ms'],
            invalidate_replica=invalidate_replica,
            guest_alive=lambda: self.qemu is not None and self.qemu.running)
        self.machine = machine
        sync.on_failure = lambda why: machine.post(pair.SecondaryLost(why))
        machine.start()
        return machine


class SecondaryHost(Host):
    """Keeps the replica; on loss of the primary, becomes the primary."""

    role = 'secondary'

    async def command(self, op: str) -> dict[str, Any]:
        machine = self.machine
        if op == 'failover':
            if not isinstance(machine, pair.SecondaryPair) or \
                    machine.state != pair.State.STANDBY:
                return {'ok': False, 'error': 'this side is not a standby '
                        'secondary'}
            machine.post(pair.Takeover())
        else:
            if machine is not None and not machine.finished.is_set():
                machine.post(pair.Stop())
            self.done.set()
        return {'ok': True}

    async def run(self) -> int:
        await self.serve_control()
        addr = transport.DataAddress(path=os.path.join(self.paths.root,
                                                       'data.sock'))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(addr.path or '')
        connected: asyncio.Future[transport.Channel] = \
            asyncio.get_running_loop().create_future()

        async def on_connect(channel: transport.Channel) -> None:
            if connected.done():
                await channel.send_json(Kind.ERROR, {
                    'error': 'this secondary already serves a primary'})
                channel.close()
            else:
                connected.set_result(channel)
        server = await transport.serve(addr, on_connect)
        self.phase = 'waiting-for-primary'
        channel = await connected
        server.close()
        hello = (await channel.recv(timeout=30)).json()
        self.primary_qemu_pid = int(hello['qemu_pid'])
        self.ram = vm.ram_path(self.spec.name, 'secondary')
        replica = epoch.ReplicaImage(self.ram, self.spec.memory_bytes,
                                     self.paths.root)
        store = ft_disk.EpochOverlayStore(
            os.path.join(self.paths.root, 'disk'), self.spec.disk_size)
        target = await store.start()
        self.store = store
        await channel.send_json(Kind.READY,
                                {'target': dataclasses.asdict(target)})
        machine = pair.SecondaryPair(
            channel=channel, replica=replica, store=store,
            activate=lambda committed: self.activate(replica, committed),
            clock=pair.RealClock(),
            detect_timeout=self.options['detect_timeout'])
        self.machine = machine
        self.phase = 'standby'
        machine.start()
        runner = asyncio.ensure_future(machine.run())
        await machine.finished.wait()
        self.phase = machine.state.value
        if machine.state == pair.State.ACTIVE and self.qemu is not None:
            # We are the primary now (unprotected until re-protected).
            stop = asyncio.ensure_future(self.done.wait())
            exited = asyncio.ensure_future(self.qemu.wait())
            await asyncio.wait([stop, exited],
                               return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            await self.stop_qemu()
            self.phase = 'stopped'
        else:
            await store.stop()
        runner.cancel()
        replica.close()
        return 0

    async def activate(self, replica: epoch.ReplicaImage,
                       committed: int) -> None:
        layers = await self.store.failover_layers(committed)
        self.disk_layers = layers
        if not await self.lock.acquire(timeout=10):
            raise RuntimeError('fencing failed: the primary still holds '
                               'the guest; not starting a second copy')
        valid, why = self.lock.replica_valid()
        if not valid:
            # The primary ran on after dropping us: resuming this replica
            # would take back what its clients have seen since.
            raise RuntimeError(f'the replica is stale ({why}); not '
                               f'resuming it')
        # Same machine: let the dead primary's QEMU release its ports.
        await wait_pid_gone(self.primary_qemu_pid, 5)
        self.qemu, self.monitor = await epoch.restore(
            self.spec, self.paths, self.ram, replica.devstate_path, layers)


def dump_tasks() -> None:
    for task in asyncio.all_tasks():
        frames = task.get_stack()
        where = ' <- '.join(f'{f.f_code.co_name}:{f.f_lineno}'
                            for f in reversed(frames))
        LOG.warning('task %s: %s', task.get_name(), where or 'starting')


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='mftvm-host')
    parser.add_argument('role', choices=['primary', 'secondary'])
    parser.add_argument('guest_dir')
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if os.environ.get('MFTVM_DEBUG') else logging.INFO,
        stream=sys.stderr,
        format='%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s')
    host: Host = (PrimaryHost if args.role == 'primary' else SecondaryHost)(
        args.guest_dir)
    async def run() -> int:
        loop = asyncio.get_running_loop()
        quiet_lost_connections(loop)
        # SIGUSR1: log where every task of this host is waiting.
        loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
        try:
            return await host.run()
        finally:
            host.publish_status()   # the last word: how this side ended
    return asyncio.run(run())


if __name__ == '__main__':
    sys.exit(main())
