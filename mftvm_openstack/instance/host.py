"""A standalone "host": the process that owns one side of a protected guest.

``mftvm protect`` starts two of these, one per role, as separate OS
processes, so killing one is a real fault::

    python -m mftvm_openstack.instance.host secondary DIR
    python -m mftvm_openstack.instance.host primary DIR

``DIR`` is the guest's state directory (``<state-dir>/<name>``); it holds
``guest.json`` (the spec and protection options), and one sub-directory
per role with that side's sockets, logs and ``status.json``.

Each host answers JSON-line commands on ``<role>/control.sock``:
``{"op": "status"}``, ``{"op": "failover"}``, ``{"op": "stop"}``.

and, while this side runs the guest unprotected,
``{"op": "protect", "secondary": "tcp:HOST:PORT", "pair_id": "..."}`` (to
protect it again onto a new secondary) and ``{"op": "unprotect"}``.

Whoever runs the guest holds its :mod:`fence <mftvm_openstack.fencing>`
(a lock file on one machine, a tooz lease across machines), renews it
while it runs, and stops the guest itself when it cannot; a secondary
takes over only once it holds the fence. ``guest.json``'s ``options``
say where to listen and connect, which fence to use, and how fast to
detect a lost primary; their defaults make the two sides of
``mftvm protect`` meet on unix sockets in one directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any, Optional

from mftvm_openstack import fencing
from mftvm_openstack.ft import disk as ft_disk
from mftvm_openstack.ft import (
    epoch,
    libvirt_domain,
    libvirt_monitor,
    pair,
    trackers,
    transport,
    vm,
)
from mftvm_openstack.ft.libvirt_monitor import LibvirtMonitor
from mftvm_openstack.ft.monitor import (
    Monitor,
    QMPMonitor,
    quiet_lost_connections,
)
from mftvm_openstack.ft.network import OutputBuffer
from mftvm_openstack.ft.relay import NbdRelay
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


async def wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        await asyncio.sleep(0.01)
    return False


#: defaults of guest.json "options" that only the host reads
HOST_DEFAULTS: dict[str, Any] = {
    'listen': None,          # secondary: data address (default: unix)
    'secondary': None,       # primary: where its secondary listens
    'nbd_host': None,        # secondary: serve the disk over TCP here
    'pair_id': 'pair-1',
    'fence_url': None,       # tooz URL; None: a lock file in guest_dir
    'fence_dir': None,       # where the lock file lives (default guest_dir)
    'fence_lease': 3,
    'fence_acquire_timeout': 10.0,
    'member': None,          # this host's name at the coordination backend
    'ram_tag': None,         # tells RAM files of one guest apart per host
    'heartbeat_interval': 0.2,
    'detect_timeout': 1.0,
    'hang_timeout': 15.0,    # QEMU silent on QMP this long counts as dead
    'replica_timeout': 3.0,  # disk replica silent this long is cut off
    'libvirt_uri': 'qemu:///system',   # for a guest run by libvirt
    'domain_name': None,     # secondary: its restored domain's name
}

#: a primary that lives on the secondary's word stops this long before
#: the secondary could declare it lost
ECHO_MARGIN = 0.3


def fence_margin(lease: float) -> float:
    """How long before its lease would lapse a holder stops its guest:
    a quarter of the lease, within 0.25-0.75 s."""
    return min(0.75, max(0.25, lease / 4))


def boot_id() -> str:
    """This machine's boot id: tells whether a peer runs on it too."""
    with open('/proc/sys/kernel/random/boot_id') as f:
        return f.read().strip()


def free_port(host: str) -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class Host:
    """One side of a protected guest, and the runner of the guest once it
    owns it: both roles end up here after booting or taking over."""

    role = ''

    def __init__(self, guest_dir: str) -> None:
        self.guest_dir = guest_dir
        self.spec, options = load_guest(guest_dir)
        self.options = {**HOST_DEFAULTS, **options}
        self.paths = vm.Paths(os.path.join(guest_dir, self.role))
        os.makedirs(self.paths.root, exist_ok=True)
        self.ram = vm.ram_path(self.spec.name,
                               self.options['ram_tag'] or self.role)
        self.fence: Optional[fencing.Fence] = None
        self.machine: Optional[Any] = None
        # The guest's QEMU: a child of ours (vm.ChildProcess), or a
        # libvirt domain's (libvirt_domain.DomainProcess).
        self.qemu: Optional[Any] = None
        self.monitor: Optional[Monitor] = None
        # What the engine works on: the guest RAM file, the disk node to
        # mirror and its size, the netdev to hold output of (libvirt
        # names its own).
        self.guest_ram = self.ram
        self.disk_node = 'disk0'
        self.disk_size = self.spec.disk_size
        self.netdev = 'n0'
        self.domain: Optional[Any] = None      # libvirt.virDomain
        self._libvirt: Optional[Any] = None    # libvirt.virConnect
        self.phase = 'starting'
        self.error = ''
        self.pair_id = ''
        self.disk_layers: list[tuple[str, str]] = []
        self.sync_window: list[float] = []
        self.listen = ''
        self.relay: Optional[NbdRelay] = None
        # CLOCK_MONOTONIC stamps of a takeover: detected, fenced, resumed
        self.takeover: dict[str, float] = {}
        self.done = asyncio.Event()
        self._wakeup = asyncio.Event()
        self._pending: Optional[tuple[str, str]] = None
        self._stopping = False
        self._lost_to_another = False

    def running_unprotected(self) -> bool:
        if isinstance(self.machine, pair.PrimaryPair) and \
                not self.machine.finished.is_set():
            return self.machine.state == pair.State.UNPROTECTED
        return self.phase in ('unprotected', 'active')

    def load_fence(self) -> fencing.Fence:
        opts = self.options
        return fencing.load_fence(
            opts['fence_url'], self.spec.name,
            member=f'{opts["member"] or socket.gethostname()}-{os.getpid()}',
            lease=int(opts['fence_lease']),
            state_dir=opts['fence_dir'] or self.guest_dir)

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = {'role': self.role, 'state': self.phase}
        if self.machine is not None:
            data.update(self.machine.status())
            # The machine's own state tells only while it runs the pair.
            if self.machine.finished.is_set() or \
                    self.phase not in ('protected', 'standby'):
                data['state'] = self.phase
        if self.error:
            data['error'] = self.error
        if self.disk_layers:
            data['disk_layers'] = self.disk_layers
        if self.sync_window:
            data['sync_window'] = self.sync_window
        if self.listen:
            data['listen'] = self.listen
        if self.takeover:
            data['takeover'] = self.takeover
        if self.fence is not None and self.fence.lease != float('inf'):
            data['lease_held'] = time.monotonic() < self.fence.deadline(0)
        data['pair_id'] = self.pair_id
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
                              list(self.machine.stats.pauses_ms))

    async def _publish_status(self) -> None:
        while True:
            try:
                self.publish_status()
            except Exception:   # a stale status.json would mislead all
                LOG.exception('cannot publish status')
            await asyncio.sleep(0.25)

    async def _control(self, reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5)
            request = json.loads(line or b'{}')
            if not isinstance(request, dict):
                raise ValueError('a request is a JSON object')
            op = request.get('op')
            if op == 'status':
                reply: dict[str, Any] = {'ok': True, 'status': self.status()}
            elif op in ('failover', 'stop', 'protect', 'unprotect'):
                reply = await self.command(op, request)
            else:
                reply = {'ok': False, 'error': f'unknown op {op!r}'}
        except Exception as exc:  # a bad client must not hurt the host
            reply = {'ok': False, 'error': str(exc)}
        with contextlib.suppress(Exception):
            writer.write(json.dumps(reply).encode() + b'\n')
            await writer.drain()
            writer.close()

    async def command(self, op: str, request: dict[str, Any]) \
            -> dict[str, Any]:
        """What both roles do once they run the guest."""
        machine = self.machine
        running = isinstance(machine, pair.PrimaryPair)
        if op == 'stop':
            self._stopping = True
            if running and not machine.finished.is_set():
                machine.post(pair.Stop())
            self._wakeup.set()
            return {'ok': True}
        if op == 'protect':
            if not self.running_unprotected():
                return {'ok': False, 'error': f'the guest is {self.phase} '
                        f'here; it can be protected only while it runs '
                        f'unprotected'}
            addr = str(request.get('secondary') or '')
            transport.DataAddress.parse(addr)   # ValueError names it
            self._pending = (addr, str(request.get('pair_id') or 'pair-1'))
            if running and not machine.finished.is_set():
                machine.post(pair.Stop())     # the unprotected machine
            self._wakeup.set()
            return {'ok': True}
        if op == 'unprotect':
            if not running or machine.state != pair.State.PROTECTED:
                return {'ok': False, 'error': 'the guest is not protected'}
            machine.post(pair.SecondaryLost('protection ended by request'))
            return {'ok': True}
        # failover
        if not running or machine.state != pair.State.PROTECTED:
            return {'ok': False, 'error': 'the guest is not protected: '
                    'there is no secondary to fail over to'}
        machine.post(pair.Stop(handover=True))
        return {'ok': True}

    async def serve_control(self) -> None:
        path = os.path.join(self.paths.root, 'control.sock')
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        await asyncio.start_unix_server(self._control, path)
        asyncio.ensure_future(self._publish_status())

    async def stop_qemu(self) -> None:
        if self.domain is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.domain.destroy)
        if self.monitor is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.monitor.execute('quit'), 2)
            await self.monitor.close()
        if self.qemu is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.qemu.wait(), 3)
            await self.qemu.kill()

    # -- a guest run by libvirt --

    async def libvirt(self) -> Any:
        if self._libvirt is None:
            self._libvirt = await libvirt_monitor.connect(
                self.options['libvirt_uri'])
        return self._libvirt

    async def lookup_domain(self, name: str) -> Any:
        conn = await self.libvirt()
        try:
            dom = await asyncio.to_thread(conn.lookupByName, name)
            active = await asyncio.to_thread(dom.isActive)
        except Exception as exc:
            raise RuntimeError(f'no domain {name} at '
                               f'{self.options["libvirt_uri"]}: {exc}') \
                from None
        if not active:
            raise RuntimeError(f'domain {name} is not running')
        return dom

    async def use_domain(self, dom: Any,
                         monitor: Optional[LibvirtMonitor] = None) -> None:
        """Run the engine on libvirt domain ``dom`` from now on."""
        if monitor is None:
            monitor = await LibvirtMonitor.for_domain(await self.libvirt(),
                                                      dom)
        try:
            ram = await libvirt_domain.ram_file(monitor)
            node, size = await libvirt_domain.guest_disk(monitor)
            qemu = await libvirt_domain.DomainProcess.of(monitor, dom.name())
            # From now on, the guest dies with this process, as a QEMU of
            # our own would: nobody else fences it if we die alone.
            await qemu.start_guard()
        except BaseException:
            await monitor.close()
            raise
        self.domain, self.monitor, self.qemu = dom, monitor, qemu
        self.guest_ram, self.disk_node, self.disk_size = ram, node, size
        self.netdev = libvirt_domain.NETDEV

    # -- ownership --

    async def keep_ownership(self) -> None:
        """Renew the fence while the guest runs here, and stop the guest
        before another host may start it.

        The guest may run while either holds: our lease (renewed every
        lease/4), or the secondary's word that it still hears us (echoed
        heartbeats: it cannot take over before the newest echoed
        heartbeat's send time plus its detection time). So a lost
        coordination backend alone stops nothing, and a host cut off from
        both stops its guest in time.

        Renewal runs in its own thread: an event loop slowed down by a
        busy host must not let a lease lapse that nobody else wants.
        """
        fence = self.fence
        assert fence is not None
        if fence.lease == float('inf'):
            return
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew_forever,
                                   args=(fence, stop), daemon=True,
                                   name='lease-renewal')
        renewer.start()
        try:
            while True:
                if self._lost_to_another:
                    await self.self_fence('another host owns the guest')
                    return
                if time.monotonic() > self.may_run_until(fence):
                    await self.self_fence(
                        'ownership could not be renewed within its lease, '
                        'and the secondary no longer vouches for us')
                    return
                await asyncio.sleep(0.05)
        finally:
            stop.set()

    def may_run_until(self, fence: fencing.Fence) -> float:
        until = fence.deadline(fence_margin(fence.lease))
        if isinstance(self.machine, pair.PrimaryPair):
            until = max(until, self.machine.peer_holds_until() - ECHO_MARGIN)
        return until

    def _renew_forever(self, fence: fencing.Fence,
                       stop: threading.Event) -> None:
        interval = fence.lease / 4
        while not stop.is_set():
            try:
                fence.renew()
            except Exception as exc:
                LOG.warning('cannot renew ownership of %s: %s',
                            self.spec.name, exc or 'no answer')
                if time.monotonic() > fence.deadline(0):
                    # Lapsed at the backend too: take it back if free.
                    got = fence.reclaim()
                    if got is False:
                        self._lost_to_another = True
                        return
                    if got:
                        LOG.warning('ownership of %s regained',
                                    self.spec.name)
            stop.wait(interval)

    async def self_fence(self, reason: str) -> None:
        LOG.error('fencing myself: %s; killing the guest', reason)
        self.error = f'fenced: {reason}'
        self.phase = 'fenced'
        if isinstance(self.machine, pair.PrimaryPair):
            self.machine.output.discard()
        if self.qemu is not None:
            await self.qemu.kill()
        self._stopping = True
        self._wakeup.set()

    # -- running the guest --

    async def watch_hang(self) -> None:
        """A QEMU that stops answering is as good as dead: kill it, so
        that its secondary takes over (and it can never wake up again
        beside the restored copy)."""
        timeout = float(self.options['hang_timeout'])
        while self.qemu is not None and self.qemu.running \
                and self.monitor is not None:
            try:
                await asyncio.wait_for(self.monitor.execute('query-status'),
                                       timeout)
            except TimeoutError:
                LOG.error('QEMU (pid %d) has not answered for %.0fs: '
                          'killing it', self.qemu.pid, timeout)
                self.error = f'QEMU hung (no answer for {timeout:.0f}s)'
                await self.qemu.kill()
                return
            except Exception:
                return      # the monitor is gone: QEMU exited
            await asyncio.sleep(1.0)

    async def own(self) -> None:
        """Run the guest here until it exits or is stopped, protecting it
        whenever a secondary is named (at start, or by a protect op)."""
        assert self.qemu is not None
        exited = asyncio.ensure_future(self.qemu.wait())
        watchdog = asyncio.ensure_future(self.watch_hang())
        try:
            while not self._stopping and not exited.done():
                if self._pending is None:
                    if self.phase not in ('active', 'fenced'):
                        self.phase = 'unprotected'
                    self._wakeup.clear()
                    waiter = asyncio.ensure_future(self._wakeup.wait())
                    await asyncio.wait([waiter, exited],
                                       return_when=asyncio.FIRST_COMPLETED)
                    waiter.cancel()
                    continue
                addr, self.pair_id = self._pending
                self._pending = None
                await self.run_protected(addr, exited)
        finally:
            exited.cancel()
            watchdog.cancel()
        if self.phase != 'fenced':
            if self.qemu.running:
                await self.stop_qemu()
                self.phase = 'stopped'
            elif not self._stopping:
                self.phase = 'failed'
                self.error = self.error or (f'QEMU exited: '
                                            f'{self.qemu.last_log_line()}')

    def _replica_cut(self, reason: str) -> None:
        if isinstance(self.machine, pair.PrimaryPair):
            self.machine.post(pair.SecondaryLost(reason))

    async def run_protected(self, addr: str,
                            exited: asyncio.Future[Any]) -> None:
        self.phase = 'syncing'
        try:
            machine = await self.protect(addr)
        except Exception as exc:
            self.error = f'protection failed: {exc}'
            LOG.error('protecting %s onto %s failed: %s', self.spec.name,
                      addr, exc)
            LOG.debug('protection failure', exc_info=True)
            self.phase = 'unprotected'
            return
        self.error = ''
        self.phase = 'protected'

        def on_exit(_: Any) -> None:
            machine.post(pair.GuestExited(
                f'QEMU (pid {self.qemu.pid if self.qemu else "?"}) '
                f'exited: {self.qemu.last_log_line() if self.qemu else ""}'))
        exited.add_done_callback(on_exit)
        await machine.run()
        exited.remove_done_callback(on_exit)
        if self.relay is not None:
            await self.relay.close()
            self.relay = None
        if machine.state == pair.State.UNPROTECTED:
            self.phase = 'unprotected'
        elif machine.state == pair.State.STOPPED and self._pending is None:
            self._stopping = True     # stopped, or handed over

    async def protect(self, address: str) -> pair.PrimaryPair:
        assert self.monitor is not None and self.qemu is not None
        opts = self.options
        addr = transport.DataAddress.parse(address)
        deadline = time.monotonic() + 30
        while True:
            try:
                channel = await transport.Channel.connect(addr)
                break
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        # The secondary sizes its replica from the disk this guest runs on
        # (libvirt's, for a domain), and restores a domain into the same
        # virtual hardware.
        hello: dict[str, Any] = {
            'qemu_pid': self.qemu.pid, 'host_pid': os.getpid(),
            'boot_id': boot_id(), 'pair_id': self.pair_id,
            'disk_size': self.disk_size}
        if self.domain is not None:
            hello['domain_xml'] = await asyncio.to_thread(
                self.domain.XMLDesc, libvirt_domain.MIGRATABLE_XML)
        await channel.send_json(Kind.HELLO, hello)
        reply = await channel.recv(timeout=60)
        if reply.kind != Kind.READY:
            channel.close()
            raise RuntimeError(f'secondary refused: '
                               f'{reply.json().get("error")}')
        target = ft_disk.NbdTarget(**reply.json()['target'])
        # QEMU reaches the replica through our relay, which cuts it off
        # when it stops answering: QEMU itself would wait for ever.
        relay = NbdRelay(target, os.path.join(self.paths.root,
                                              'nbd-relay.sock'),
                         stall_timeout=float(opts['replica_timeout']),
                         on_cut=self._replica_cut)
        self.relay = relay
        target = await relay.start()

        async def heartbeat() -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while True:
                    await channel.send(Kind.HEARTBEAT)
                    await asyncio.sleep(opts['heartbeat_interval'])
        # Until the machine beats itself: the secondary counts silence as
        # our death, and the initial sync and setup take a while.
        beating = asyncio.ensure_future(heartbeat())
        try:
            sync = ft_disk.load_disk_sync(opts['disk_sync'], self.monitor,
                                          self.disk_node)
            started = time.monotonic()
            await sync.start(target)
            # CLOCK_MONOTONIC is system-wide: tests compare it with their
            # own stamps of the guest's output.
            self.sync_window = [started, time.monotonic()]
            tracker = trackers.load_tracker(
                opts['tracker'], self.guest_ram, self.spec.memory_bytes,
                self.qemu.pid)
            capturer = epoch.CheckpointCapturer(self.monitor, tracker,
                                                self.paths.root)
            await capturer.setup()
            output = OutputBuffer(self.paths.netout, self.paths.netin,
                                  self.netdev)
            await output.attach(self.monitor)
        except BaseException:
            beating.cancel()
            channel.close()
            await relay.close()
            raise
        fence = self.fence
        assert fence is not None
        pair_id = self.pair_id

        async def invalidate_replica() -> None:
            # Until this lands, held output stays held: a primary cut off
            # from the backend as well runs into its lease and fences
            # itself, and the replica then is still the truth.
            while True:
                try:
                    await asyncio.to_thread(
                        fence.mark_stale, pair_id,
                        'the primary went on unprotected')
                    return
                except Exception as exc:
                    LOG.warning('cannot mark the replica stale: %s', exc)
                    await asyncio.sleep(0.2)
        machine = pair.PrimaryPair(
            capturer=capturer, disk=sync, output=output, channel=channel,
            monitor=self.monitor, clock=pair.RealClock(),
            epoch_ms=opts['epoch_ms'],
            idle_epoch_ms=opts.get('idle_epoch_ms') or 0,
            heartbeat_interval=opts['heartbeat_interval'],
            invalidate_replica=invalidate_replica,
            guest_alive=lambda: self.qemu is not None and self.qemu.running)
        self.machine = machine
        sync.on_failure = lambda why: machine.post(pair.SecondaryLost(why))
        machine.start()
        beating.cancel()
        return machine


class PrimaryHost(Host):
    """Boots the guest and runs it, protected by the secondary it names."""

    role = 'primary'

    async def run(self) -> int:
        self.fence = self.load_fence()
        # Short: at boot the guest must not be running anywhere.
        won = await asyncio.to_thread(self.fence.acquire, 1.0)
        if not won:
            self.error = (f'another process runs guest {self.spec.name}; '
                          f'not starting a second copy')
            LOG.error(self.error)
            self.phase = 'failed'
            return 1
        owning = asyncio.ensure_future(self.keep_ownership())
        try:
            return await self._run()
        finally:
            owning.cancel()
            if self.phase != 'fenced':
                await asyncio.to_thread(self.fence.release)
            self.fence.close()

    async def _run(self) -> int:
        await self.serve_control()
        started = await (self.adopt_domain() if self.spec.domain
                         else self.start_qemu())
        if not started:
            self.phase = 'failed'
            return 1
        if self.options.get('start_delay'):
            self.phase = 'unprotected'
            await asyncio.sleep(self.options['start_delay'])
        secondary = self.options['secondary'] or 'unix:' + os.path.join(
            self.guest_dir, 'secondary', 'data.sock')
        self._pending = (secondary, self.options['pair_id'])
        await self.own()
        if not self.spec.domain:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.ram)
        return 0 if self.phase in ('stopped', 'protected') else 1

    async def start_qemu(self) -> bool:
        self.disk_layers = [(self.spec.disk, self.spec.disk_format)]
        fd = os.open(self.ram, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, self.spec.memory_bytes)
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.paths.qmp)
        self.qemu = await vm.ChildProcess.start(
            vm.qemu_argv(self.spec, self.paths, self.ram), self.paths.log)
        try:
            self.monitor = await QMPMonitor.connect(self.paths.qmp,
                                                    'primary-qemu')
        except Exception:
            await self.qemu.wait()
            self.error = f'QEMU failed to start: {self.qemu.last_log_line()}'
            LOG.error(self.error)
            return False
        return True

    async def adopt_domain(self) -> bool:
        """Take on the running libvirt domain ``spec.domain``: its QEMU
        is libvirt's, the engine drives it through libvirt's monitor."""
        try:
            await self.use_domain(await self.lookup_domain(self.spec.domain))
        except Exception as exc:
            self.error = (f'cannot protect libvirt domain '
                          f'{self.spec.domain}: {exc}')
            LOG.error(self.error)
            return False
        return True


class SecondaryHost(Host):
    """Keeps the replica; on loss of the primary, runs the guest."""

    role = 'secondary'
    #: from the primary's HELLO: does it run on this machine, and the
    #: XML of its libvirt domain (None: not a libvirt guest)
    primary_local = True
    primary_xml: Optional[str] = None

    async def command(self, op: str, request: dict[str, Any]) \
            -> dict[str, Any]:
        machine = self.machine
        if isinstance(machine, pair.SecondaryPair):
            if op == 'failover':
                if machine.state != pair.State.STANDBY:
                    return {'ok': False, 'error': 'this side is not a '
                            'standby secondary'}
                machine.post(pair.Takeover())
                return {'ok': True}
            if op == 'stop':
                self._stopping = True
                if not machine.finished.is_set():
                    machine.post(pair.Stop())
                self.done.set()
                self._wakeup.set()
                return {'ok': True}
        elif machine is None and op == 'stop':
            self._stopping = True
            self.done.set()
            return {'ok': True}
        return await super().command(op, request)

    def listen_address(self) -> transport.DataAddress:
        listen = self.options['listen']
        if not listen:
            return transport.DataAddress(path=os.path.join(
                self.paths.root, 'data.sock'))
        addr = transport.DataAddress.parse(listen)
        if addr.path is None and addr.port == 0:
            assert addr.host is not None
            addr = transport.DataAddress(host=addr.host,
                                         port=free_port(addr.host))
        return addr

    async def run(self) -> int:
        await self.serve_control()
        addr = self.listen_address()
        if addr.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(addr.path)
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
        self.listen = str(addr)
        self.phase = 'waiting-for-primary'
        waiting = asyncio.ensure_future(self.done.wait())
        await asyncio.wait([connected, waiting],
                           return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        server.close()
        if not connected.done():
            self.phase = 'stopped'
            return 0
        channel = connected.result()
        hello = (await channel.recv(timeout=30)).json()
        self.primary_qemu_pid = int(hello['qemu_pid'])
        # Only a primary on this very machine has a pid to wait for.
        self.primary_local = hello.get('boot_id') == boot_id()
        self.primary_xml = hello.get('domain_xml')
        disk_size = int(hello.get('disk_size') or self.spec.disk_size)
        self.pair_id = str(hello.get('pair_id') or self.options['pair_id'])
        replica = epoch.ReplicaImage(self.ram, self.spec.memory_bytes,
                                     self.paths.root)
        nbd_host = self.options['nbd_host']
        store = ft_disk.EpochOverlayStore(
            os.path.join(self.paths.root, 'disk'), disk_size,
            listen=(nbd_host, free_port(nbd_host)) if nbd_host else None)
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
        runner.cancel()
        if machine.state == pair.State.ACTIVE and self.qemu is not None:
            # We are the primary now, unprotected until a protect op.
            owning = asyncio.ensure_future(self.keep_ownership())
            try:
                await self.own()
            finally:
                owning.cancel()
                if self.fence is not None and self.phase != 'fenced':
                    await asyncio.to_thread(self.fence.release)
        else:
            await store.stop()
        replica.close()
        # The replica (or, after a takeover, the guest's RAM; its QEMU
        # dies with this process) would otherwise hold host memory in
        # /dev/shm after the guest is gone.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ram)
        if self.fence is not None:
            self.fence.close()
        return 0

    async def activate(self, replica: epoch.ReplicaImage,
                       committed: int) -> None:
        self.takeover['detected'] = time.monotonic()
        layers = await self.store.failover_layers(committed)
        self.disk_layers = layers
        fence = self.load_fence()
        won = await asyncio.to_thread(
            fence.acquire, self.options['fence_acquire_timeout'])
        if not won:
            fence.close()
            raise RuntimeError('fencing failed: the primary still holds '
                               'the guest; not starting a second copy')
        try:
            valid, why = await asyncio.to_thread(fence.replica_valid,
                                                 self.pair_id)
        except Exception as exc:
            valid, why = False, f'cannot tell whether it is current: {exc}'
        if not valid:
            # The primary ran on after dropping us: resuming this replica
            # would take back what its clients have seen since.
            await asyncio.to_thread(fence.release)
            fence.close()
            raise RuntimeError(f'the replica is stale ({why}); not '
                               f'resuming it')
        self.fence = fence
        self.takeover['fenced'] = time.monotonic()
        if self.primary_local:
            # Same machine: let the dead primary's QEMU release its ports.
            await wait_pid_gone(self.primary_qemu_pid, 5)
        if self.spec.domain:
            name = self.options['domain_name'] or self.spec.domain
            dom, monitor = await libvirt_domain.restore(
                await self.libvirt(), self.spec, self.paths.serial,
                self.ram, replica.devstate_path, layers, name=name,
                xml=self.primary_xml)
            await self.use_domain(dom, monitor)
        else:
            self.qemu, self.monitor = await epoch.restore(
                self.spec, self.paths, self.ram, replica.devstate_path,
                layers)
        self.takeover['resumed'] = time.monotonic()


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
