"""QEMU command lines and processes.

A protected guest is described once, by a :class:`GuestSpec`, and the
same spec produces both the primary's command line and the command line
that restores the guest on the secondary: device models, machine type,
MAC and ROMs must be identical for a device-state migration to load.

Guest RAM always lives in a shared ``memory-backend-file`` so the engine
can read it (primary) or write it (secondary) without QEMU's help::

    spec = GuestSpec(name='vm0', kernel=..., initrd=..., disk='vm0.raw')
    paths = Paths('/var/lib/mftvm/vm0/primary')
    argv = qemu_argv(spec, paths, ram_path('vm0', 'primary'))
    proc = await ChildProcess.start(argv, paths.log)

Children are started with ``PR_SET_PDEATHSIG`` = SIGKILL: when the host
process that owns a QEMU dies, its QEMU dies with it, so a dead host can
never leave a second copy of a guest running.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Sequence
from typing import Any, Optional

# The guest's description is part of the contract (it crosses the agent's
# RPC and guest.json); the engine uses it from there.
from mftvm_openstack.contract.spec import (  # noqa: F401
    GuestDisk,
    GuestNic,
    GuestSpec,
    HostForward,
)
from mftvm_openstack.ft import log_bound

QEMU_BINARY = 'qemu-system-x86_64'
QSD_BINARY = 'qemu-storage-daemon'
#: x-ignore-shared, announce-self and blockdev-mirror copy-mode are older,
#: but this is the oldest QEMU the functional tier has proven.
MIN_QEMU_VERSION = (7, 2)
PAGE_SIZE = 4096


class VMError(Exception):
    """A guest cannot be started as asked; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where one side of a protected guest keeps its runtime files."""

    root: str

    @property
    def qmp(self) -> str:
        return os.path.join(self.root, 'qmp.sock')

    @property
    def serial(self) -> str:
        return os.path.join(self.root, 'serial.log')

    @property
    def log(self) -> str:
        return os.path.join(self.root, 'qemu.log')

    @property
    def netout(self) -> str:
        return os.path.join(self.root, 'net-out.sock')

    @property
    def netin(self) -> str:
        return os.path.join(self.root, 'net-in.sock')

    def net_out(self, index: int) -> str:
        """NIC ``index``'s output-commit sockets (the first's:
        :attr:`netout`, :attr:`netin`)."""
        return self.netout if index == 0 else os.path.join(
            self.root, f'net{index}-out.sock')

    def net_in(self, index: int) -> str:
        return self.netin if index == 0 else os.path.join(
            self.root, f'net{index}-in.sock')


#: the environment variable that names where guest RAM files go
RAM_DIR_ENV = 'MFTVM_RAM_DIR'


def ram_dir() -> str:
    """Where guest RAM files go: ``$MFTVM_RAM_DIR``, or ``/dev/shm``
    (tmpfs: fast, no disk)."""
    return os.environ.get(RAM_DIR_ENV) or '/dev/shm'


def ram_path(name: str, role: str) -> str:
    """The shared RAM file of ``name`` on this host (in :func:`ram_dir`)."""
    safe = re.sub(r'[^A-Za-z0-9_.-]', '_', name)
    return os.path.join(ram_dir(), f'mftvm-{safe}-{role}.ram')


def disk_blockdevs(node: str, layers: Sequence[tuple[str, str]]) -> list[str]:
    """``-blockdev`` arguments for a chain of (filename, format) layers.

    The first layer is the base; each later layer is a qcow2 overlay on
    the one before. The top node is called ``node``.
    """
    args: list[str] = []
    below = None
    for i, (filename, fmt) in enumerate(layers):
        top = i == len(layers) - 1
        name = node if top else f'{node}-l{i}'
        if filename.startswith('json:'):
            # a shared image (ft/shared_image.py: chain_filename)
            protocol = dict(json.loads(filename[5:]),
                            **{'node-name': f'{name}-file'})
        else:
            protocol = {'driver': 'file', 'filename': filename,
                        'node-name': f'{name}-file'}
        args += ['-blockdev', json.dumps(protocol)]
        fmt_node: dict[str, Any] = {
            'driver': fmt, 'file': f'{name}-file', 'node-name': name}
        if fmt == 'qcow2':
            fmt_node['backing'] = below
        args += ['-blockdev', json.dumps(fmt_node)]
        below = name
    return args


def netdev_id(index: int) -> str:
    """The id of NIC ``index``'s netdev in the engine's own QEMU."""
    return f'n{index}'


def user_net(index: int) -> str:
    """NIC ``index``'s user-mode network: the first has QEMU's default
    (10.0.2.0/24), the next 10.0.3.0/24 and so on, so that a guest's
    routes to them do not overlap."""
    return f'10.0.{2 + index}.0/24'


def qemu_argv(spec: GuestSpec, paths: Paths, ram_file: str,
              disk_layers: Optional[Sequence[tuple[str, str]]] = None,
              incoming: bool = False,
              disk_chains: Optional[Sequence[Sequence[tuple[str, str]]]]
              = None) -> list[str]:
    """The QEMU command line for ``spec``.

    ``disk_layers`` replaces the guest's first disk, ``disk_chains``
    every disk, in order (the secondary restores onto its replica
    chains); ``incoming`` makes QEMU wait for a ``migrate-incoming`` of
    device state instead of booting. Disk ``i`` is node ``disk{i}``, NIC
    ``i`` netdev ``n{i}`` with MAC ``spec.nic_mac(i)``.
    """
    chains: list[Sequence[tuple[str, str]]] = [
        [(path, fmt)] for path, fmt, _ in spec.all_disks]
    if disk_layers:
        chains[0] = disk_layers
    if disk_chains:
        if len(disk_chains) != len(chains):
            raise VMError(f'the guest has {len(chains)} disks, but '
                          f'{len(disk_chains)} replica chains were given')
        chains = list(disk_chains)
    disk_args: list[str] = []
    for i, layers in enumerate(chains):
        disk_args += [*disk_blockdevs(f'disk{i}', layers),
                      '-device', f'virtio-blk-pci,drive=disk{i},id=vd{i}']
    nic_args: list[str] = []
    for i, nic_forwards in enumerate(spec.nic_forwards):
        # A restoring QEMU opens its port forwards only once the guest
        # runs (restore() adds them): a connection taken while the guest
        # is still paused loses its first SYN and waits out a slow
        # retransmit.
        forwards = () if incoming else nic_forwards
        netdev = f'user,id={netdev_id(i)},ipv6=off' + (
            f',net={user_net(i)}' if i else '') + ''.join(
            f',hostfwd={f.qemu()}' for f in forwards)
        nic_args += [
            '-netdev', netdev,
            # No option ROM: the kernel boots directly, and every ROM is
            # migrated again at each checkpoint.
            '-device', f'virtio-net-pci,netdev={netdev_id(i)},id=nic{i},'
                       f'mac={spec.nic_mac(i)},romfile=']
    argv = [
        QEMU_BINARY, '-name', spec.name, '-no-user-config', '-nodefaults',
        '-accel', spec.accel,
        '-machine', 'pc,memory-backend=ram0',
        '-m', f'{spec.memory_mib}M', '-smp', str(spec.smp),
        '-object', (f'memory-backend-file,id=ram0,size={spec.memory_mib}M,'
                    f'mem-path={ram_file},share=on'),
        '-kernel', spec.kernel, '-initrd', spec.initrd,
        '-append', spec.append,
        *disk_args,
        *nic_args,
        '-chardev', f'file,id=ser0,path={paths.serial},append=on',
        '-serial', 'chardev:ser0',
        '-display', 'none', '-vga', 'none',
        '-qmp', f'unix:{paths.qmp},server=on,wait=off',
    ]
    if incoming:
        argv += ['-incoming', 'defer']
    return argv


def qsd_argv(qmp_path: str) -> list[str]:
    """A bare ``qemu-storage-daemon``: everything else is added over QMP."""
    return [QSD_BINARY, '--chardev',
            f'socket,id=qmp0,path={qmp_path},server=on,wait=off',
            '--monitor', 'chardev=qmp0']


# -- host probing -----------------------------------------------------------

def probe_accelerator() -> str:
    """``kvm`` where hardware virtualisation really works, else ``tcg``.

    An openable /dev/kvm is not enough: a PVM host exposes /dev/kvm but
    hangs ordinary guests, so require a hardware KVM module to be loaded.
    ``MFTVM_ACCEL`` overrides the probe.
    """
    forced = os.environ.get('MFTVM_ACCEL')
    if forced:
        if forced not in ('kvm', 'tcg'):
            raise VMError(f'MFTVM_ACCEL={forced!r} is not kvm or tcg')
        return forced
    if not os.access('/dev/kvm', os.R_OK | os.W_OK):
        return 'tcg'
    for module in ('kvm_intel', 'kvm_amd'):
        if os.path.isdir(f'/sys/module/{module}'):
            return 'kvm'
    return 'tcg'


def qemu_version(binary: str = QEMU_BINARY) -> tuple[int, int]:
    """The installed QEMU's (major, minor); VMError if missing or too old."""
    path = shutil.which(binary)
    if path is None:
        raise VMError(f'{binary} not found: install it with '
                      f'"apt-get install qemu-system-x86 qemu-utils"')
    out = subprocess.run([path, '--version'], capture_output=True,
                         text=True, check=False).stdout
    match = re.search(r'version (\d+)\.(\d+)', out)
    if not match:
        raise VMError(f'cannot tell the version of {path}: {out.strip()!r}')
    version = (int(match.group(1)), int(match.group(2)))
    if version < MIN_QEMU_VERSION:
        raise VMError(
            f'{path} is QEMU {version[0]}.{version[1]}; mftvm needs '
            f'{MIN_QEMU_VERSION[0]}.{MIN_QEMU_VERSION[1]} or newer')
    if shutil.which(QSD_BINARY) is None:
        raise VMError(f'{QSD_BINARY} not found: install qemu-utils / '
                      f'qemu-system-common')
    return version


def probe_disk(path: str) -> tuple[str, int]:
    """(format, virtual size) of ``path``; VMError if missing or in use."""
    if not os.path.exists(path):
        raise VMError(f'disk {path} does not exist: give an existing image '
                      f'(create one with "qemu-img create -f raw {path} 1G")')
    if not os.access(path, os.R_OK | os.W_OK):
        raise VMError(f'disk {path} is not readable and writable by this '
                      f'user')
    result = subprocess.run(
        ['qemu-img', 'info', '--output=json', path],
        capture_output=True, text=True, check=False)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1:] or ['unknown error']
        if 'lock' in reason[0]:
            raise VMError(f'disk {path} is in use by another process; '
                          f'stop that process or choose another disk')
        raise VMError(f'disk {path} is not a usable image: {reason[0]}')
    info = json.loads(result.stdout)
    fmt = info['format']
    # qemu-img info only reads; opening for writing meets QEMU's lock.
    probe = subprocess.run(['qemu-io', '-f', fmt, '-c', 'quit', path],
                           capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        if 'lock' in probe.stderr:
            raise VMError(f'disk {path} is in use by another process; '
                          f'stop that process or choose another disk')
        why = (probe.stderr.strip().splitlines() or ['unknown'])[0]
        raise VMError(f'disk {path} cannot be opened for writing: {why}')
    if fmt not in ('raw', 'qcow2'):
        raise VMError(f'disk {path} is {fmt}; use raw or qcow2')
    if info.get('backing-filename'):
        raise VMError(f'disk {path} has a backing file; flatten it first '
                      f'("qemu-img convert")')
    return fmt, int(info['virtual-size'])


def check_kernel(path: str) -> None:
    """VMError unless ``path`` looks like a bootable x86 Linux kernel."""
    try:
        with open(path, 'rb') as f:
            header = f.read(0x208)
    except OSError as exc:
        raise VMError(f'kernel {path}: {exc.strerror}; give the path of a '
                      f'bzImage such as /boot/vmlinuz-*') from None
    # The x86 boot protocol puts the magic "HdrS" at 0x202.
    if len(header) < 0x206 or header[0x202:0x206] != b'HdrS':
        raise VMError(f'kernel {path} is not a bootable x86 Linux kernel '
                      f'(no bzImage header); give /boot/vmlinuz-* or similar')


# -- processes --------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def parent_death_signal(sig: int) -> None:
    """In a child before exec: get ``sig`` when the forking thread
    (our event loop's) exits."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)


def _die_with_parent() -> None:
    parent_death_signal(signal.SIGKILL)


class ChildProcess:
    """A QEMU (or qsd) owned by this host process; dies when it dies.

    Its log, ``log_path``, is kept under ``log_limit`` bytes while it runs
    (:mod:`.log_bound`): it is looked at every ``log_check_s`` seconds.
    """

    def __init__(self, proc: asyncio.subprocess.Process, argv: list[str],
                 log_path: str, log_limit: int = log_bound.LIMIT,
                 log_check_s: float = 10.0) -> None:
        self.proc = proc
        self.argv = argv
        self.log_path = log_path
        self.log_limit = log_limit
        self._log_keeper = asyncio.ensure_future(
            self._keep_log_bounded(log_check_s))

    @classmethod
    async def start(cls, argv: list[str], log_path: str,
                    log_limit: int = log_bound.LIMIT,
                    log_check_s: float = 10.0) -> ChildProcess:
        with open(log_path, 'ab') as log:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=_die_with_parent)
        return cls(proc, argv, log_path, log_limit, log_check_s)

    async def _keep_log_bounded(self, every: float) -> None:
        wait = asyncio.ensure_future(self.proc.wait())
        try:
            while not wait.done():
                await asyncio.wait([wait], timeout=every)
                try:
                    await asyncio.to_thread(log_bound.cut_back,
                                            self.log_path, self.log_limit)
                except OSError:
                    pass    # (its directory removed): nothing to bound
        finally:
            wait.cancel()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def last_log_line(self) -> str:
        try:
            with open(self.log_path, 'rb') as f:
                lines = f.read()[-4096:].decode(errors='replace').splitlines()
        except OSError:
            return ''
        return lines[-1].strip() if lines else ''

    async def wait(self) -> int:
        return await self.proc.wait()

    async def kill(self) -> None:
        if self.running:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass
        await self.proc.wait()


def chain_filename(layers: Sequence[tuple[str, str]]) -> str:
    """A ``json:`` filename for qemu-img/qemu-io that opens a layer chain
    (base first) as one image, e.g. to flatten or check a replica."""
    node: Any = None
    for filename, fmt in layers:
        node = {'driver': fmt, 'file': {'driver': 'file',
                                        'filename': filename},
                **({'backing': node} if fmt == 'qcow2' else {})}
    return 'json:' + json.dumps(node)


def flatten(layers: Sequence[tuple[str, str]], out_path: str) -> None:
    """Write the content of a layer chain to the raw file ``out_path``."""
    subprocess.run(['qemu-img', 'convert', '-U', '-O', 'raw',
                    chain_filename(layers), out_path],
                   check=True, capture_output=True, umask=0o077)
