"""Protected guests of this one machine: protect, status, failover, stop.

These are what the ``mftvm`` CLI calls. A guest lives in
``<state-dir>/<name>/``; its two sides run as instance processes
(:mod:`mftvm_openstack.instance`) started detached, so the CLI can
return once the guest is protected::

    spec = make_spec('vm0', kernel=..., initrd=..., disk=...)
    guest_dir = protect(spec, ProtectOptions(), state_dir)
    status(state_dir, 'vm0')      # LocalGuestStatus(primary=..., ...)
    stop(state_dir, 'vm0')

Every user mistake is a :class:`UserError` with a one-line message that
says what to do; nothing is left running when protect() fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import Any, Optional

from mftvm_openstack.contract import plugins
from mftvm_openstack.contract.control import ControlOp, ControlRequest
from mftvm_openstack.contract.limits import (
    MAX_DISKS,
    MAX_NICS,
    MEMORY_MIB_RANGE,
    SMP_RANGE,
)
from mftvm_openstack.contract.options import HostOptions
from mftvm_openstack.contract.record import (
    ContractError,
    Record,
    field,
    shown,
)
from mftvm_openstack.contract.spec import NAME_PATTERN, ProtectionOptions
from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import InstanceStatus
from mftvm_openstack.files import (
    NotAllowed,
    file_in,
    private_dir,
    write_json_atomic,
)
from mftvm_openstack.ft import capacity, pair_tls, trackers, vm
from mftvm_openstack.ft.pair.cadence import EpochPolicy
from mftvm_openstack.instance.client import control, pid_alive, status_of
from mftvm_openstack.instance.config import new_tls_dir
from mftvm_openstack.waiting import wait_until

ROLES = (Role.PRIMARY, Role.SECONDARY)
NAME_RE = re.compile(NAME_PATTERN)


class UserError(Exception):
    """A mistake the user can fix; the message says how."""


@dataclasses.dataclass
class ProtectOptions:
    epoch_ms: int = 200
    #: how long an epoch may run while the guest sends nothing (no client
    #: waits on it); never less than epoch_ms, 0: always epoch_ms
    idle_epoch_ms: int = 1000
    tracker: str = plugins.AUTO_TRACKER
    disk_sync: str = plugins.DEFAULT_DISK_SYNC
    detect_timeout: float = 1.0
    #: the bounds (see [ft] in mftvm_openstack.conf)
    ack_timeout: float = 10.0
    max_held_epochs: int = 50
    max_held_bytes: int = 32 << 20
    #: the adaptive epoch (see [ft] adaptive_epochs and ft.pair.cadence)
    adaptive_epochs: bool = True
    output_batch_ms: int = 2
    min_epoch_ms: int = 10
    max_pause_percent: int = 25
    #: seconds the guest runs unprotected before protection starts (the
    #: initial sync then copies a live guest's disk)
    start_delay: float = 0.0
    protect_timeout: float = 180.0
    #: mutual TLS between the two sides, with credentials made for this
    #: pair (see ft.pair_tls)
    tls: bool = True


#: where ``mftvm protect`` lets a disk be unless told (colon-separated)
DISK_DIRS_ENV = 'MFTVM_DISK_DIRS'


def default_disk_dirs() -> list[str]:
    """``$MFTVM_DISK_DIRS``'s directories, else the current one."""
    dirs = [d for d in os.environ.get(DISK_DIRS_ENV, '').split(':') if d]
    return [os.path.abspath(d) for d in dirs] or [os.getcwd()]


def check_disk(spec: vm.GuestSpec, dirs: Sequence[str]) -> None:
    """UserError unless each of the spec's disks is a regular file in
    one of ``dirs``, reached without a symbolic link (a link planted
    where the disk should be would have QEMU, perhaps as root, write
    through it)."""
    for path, _, _ in spec.all_disks:
        try:
            file_in(path, [os.path.abspath(d) for d in dirs])
        except NotAllowed as exc:
            raise UserError(f'--disk {exc}; give --disk-dir or '
                            f'${DISK_DIRS_ENV}') from None
        except OSError as exc:
            raise UserError(f'--disk {path}: {exc.strerror}') from None


def default_state_dir() -> str:
    if os.environ.get('MFTVM_STATE_DIR'):
        return os.environ['MFTVM_STATE_DIR']
    if os.geteuid() == 0:
        return '/var/lib/mftvm'
    return os.path.expanduser('~/.local/state/mftvm')


def parse_nic(text: str) -> tuple[vm.HostForward, ...]:
    """``user,hostfwd=tcp:ADDR:PORT-:GPORT[,hostfwd=...]`` → forwards."""
    parts = text.split(',')
    if parts[0] != 'user':
        raise UserError(f'--nic {shown(text)}: only "user" networking is '
                        f'supported, e.g. user,hostfwd=tcp:127.0.0.1:8080-:80')
    forwards = []
    for part in parts[1:]:
        m = re.fullmatch(r'hostfwd=tcp:([0-9.]{0,15}):(\d{1,5})-:(\d{1,5})',
                         part)
        if not m:
            raise UserError(f'--nic: cannot parse {shown(part)}; write '
                            f'hostfwd=tcp:127.0.0.1:HOSTPORT-:GUESTPORT')
        try:    # checked here: the port is bound before the spec is
            forwards.append(vm.HostForward.from_dict({
                'host_addr': m.group(1) or '127.0.0.1',
                'host_port': int(m.group(2)),
                'guest_port': int(m.group(3))}))
        except ContractError as exc:
            raise UserError(f'--nic {shown(part)}: {exc.field} '
                            f'{exc.reason}') \
                from None
    return tuple(forwards)


def check_port_free(fwd: vm.HostForward) -> None:
    with socket.socket() as s:
        try:
            s.bind((fwd.host_addr, fwd.host_port))
        except OSError as exc:
            raise UserError(f'port {fwd.host_addr}:{fwd.host_port} is not '
                            f'available ({exc.strerror}); choose another '
                            f'host port in --nic') from None


def make_spec(name: str, kernel: str, initrd: str, disk: str,
              append: Optional[str] = None, memory_mib: int = 128,
              smp: int = 1, nic: Optional[str] = None,
              more_disks: Sequence[str] = (),
              more_nics: Sequence[str] = ()) -> vm.GuestSpec:
    """Validate the user's guest description and build its spec
    (``more_disks``, ``more_nics``: the guest's disks and NICs after the
    first, each replicated and held as the first is)."""
    if len(more_disks) + 1 > MAX_DISKS:
        raise UserError(f'--disk: at most {MAX_DISKS} disks')
    if len(more_nics) + 1 > MAX_NICS:
        raise UserError(f'--nic: at most {MAX_NICS} NICs')
    if not NAME_RE.fullmatch(name):
        raise UserError(f'guest name {name!r}: use letters, digits, "_", '
                        f'"." and "-" (at most 63)')
    try:
        vm.qemu_version()
        vm.check_kernel(kernel)
        if not os.path.isfile(initrd):
            raise UserError(f'initrd {initrd} does not exist')
        fmt, size = vm.probe_disk(disk)
        extra = [vm.GuestDisk(path=os.path.abspath(path),
                              format=probed[0], size=probed[1])
                 for path in more_disks
                 for probed in [vm.probe_disk(path)]]
    except vm.VMError as exc:
        raise UserError(str(exc)) from None
    low, high = MEMORY_MIB_RANGE
    if not low <= memory_mib <= high:
        raise UserError(f'--memory {memory_mib}: give {low} to {high} MiB')
    low, high = SMP_RANGE
    if not low <= smp <= high:
        raise UserError(f'--smp {smp}: give {low} to {high}')
    forwards = parse_nic(nic) if nic else ()
    nics = [vm.GuestNic(forwards=parse_nic(text)) for text in more_nics]
    for fwd in [*forwards, *(f for n in nics for f in n.forwards)]:
        check_port_free(fwd)
    spec = vm.GuestSpec(
        name=name, kernel=os.path.abspath(kernel),
        initrd=os.path.abspath(initrd), disk=os.path.abspath(disk),
        append=append if append is not None else 'console=ttyS0 quiet',
        disk_format=fmt, disk_size=size, memory_mib=memory_mib, smp=smp,
        forwards=forwards, accel=vm.probe_accelerator(),
        more_disks=tuple(extra) or None, more_nics=tuple(nics) or None)
    try:        # what the instance process will check when it loads it
        vm.GuestSpec.from_json(spec.to_json())
    except ContractError as exc:
        raise UserError(f'{exc.field.removeprefix("spec.")}: '
                        f'{exc.reason}') from None
    return spec


def _check_state_dir(state_dir: str) -> None:
    try:
        # 0700 if we make it (an existing one is the user's to set)
        os.makedirs(state_dir, 0o700, exist_ok=True)
    except OSError as exc:
        raise UserError(f'state dir {state_dir}: {exc.strerror}; give a '
                        f'writable --state-dir') from None
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise UserError(f'state dir {state_dir} is not writable; give a '
                        f'writable --state-dir')


def _check_options(opts: ProtectOptions) -> None:
    """The contract's checks of the protection options, as CLI errors
    (``--epoch-ms 5: must be from 20 to 10000 (got 5)``)."""
    try:
        ProtectionOptions.from_dict({
            'epoch_ms': opts.epoch_ms, 'idle_epoch_ms': opts.idle_epoch_ms,
            'disk_sync': opts.disk_sync})
    except ContractError as exc:
        flag = '--' + exc.field.replace('_', '-')
        raise UserError(f'{flag} {getattr(opts, exc.field)}: '
                        f'{exc.reason}') from None
    try:
        EpochPolicy(output_batch_ms=opts.output_batch_ms,
                    min_epoch_ms=opts.min_epoch_ms,
                    max_pause_percent=opts.max_pause_percent)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    # Not the contract's choice check: this also says whether the
    # tracker can run on this host.
    try:
        trackers.tracker_class(opts.tracker)
    except trackers.TrackerError as exc:
        raise UserError(f'--tracker: {exc}') from None


def guest_dir(state_dir: str, name: str) -> str:
    return os.path.join(state_dir, name)


def _spawn_host(role: Role, gdir: str) -> subprocess.Popen[bytes]:
    log = open(os.path.join(gdir, f'{role}-host.log'), 'ab')
    with log:
        return subprocess.Popen(
            [sys.executable, '-m', 'mftvm_openstack.instance', role,
             gdir], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True)


def _host_log_tail(gdir: str, role: Role) -> str:
    try:
        with open(os.path.join(gdir, f'{role}-host.log'), 'rb') as f:
            lines = f.read()[-8192:].decode(errors='replace').splitlines()
    except OSError:
        return ''
    errors = [ln for ln in lines if ' ERROR ' in ln]
    return (errors or lines or [''])[-1].strip()


def _check_capacity(spec: vm.GuestSpec, gdir: str) -> None:
    """Both sides' RAM files and the disk replica fit on this machine
    (see :mod:`mftvm_openstack.ft.capacity`)."""
    try:
        capacity.check([
            capacity.Need(vm.ram_dir(), 2 * spec.memory_bytes,
                          f'guest {spec.name} RAM (both sides)'),
            capacity.Need(os.path.join(gdir, Role.SECONDARY, 'disk'),
                          sum(capacity.replica_disk_bytes(size)
                              for _, _, size in spec.all_disks),
                          f'guest {spec.name} disk replica')])
    except capacity.CapacityError as exc:
        raise UserError(str(exc)) from None


def protect(spec: vm.GuestSpec, opts: ProtectOptions,
            state_dir: str,
            host_options: Optional[dict[str, Any]] = None) -> str:
    """Start both sides of ``spec`` and return once it is protected.

    ``host_options`` adds options only the host processes read (see
    :class:`~mftvm_openstack.contract.options.HostOptions`), e.g.
    ``libvirt_uri``.
    """
    _check_options(opts)
    try:
        options = HostOptions.from_dict(
            {**dataclasses.asdict(opts), **(host_options or {})},
            'options')
    except ContractError as exc:
        raise UserError(str(exc)) from None
    _check_state_dir(state_dir)
    gdir = guest_dir(state_dir, spec.name)
    if any((s := _readable_status(gdir, role)) and s.alive
           for role in ROLES):
        raise UserError(f'guest {spec.name} is already running; stop it '
                        f'with "mftvm stop {spec.name}" first')
    _check_capacity(spec, gdir)
    shutil.rmtree(gdir, ignore_errors=True)
    private_dir(gdir)
    write_json_atomic(os.path.join(gdir, 'guest.json'),
                      {'spec': spec.to_json(),
                       'options': options.to_dict()})
    if opts.tls:
        # Both sides run here: each gets its half in the guest's own
        # 0700 directory, never over the stream the creds protect.
        creds = pair_tls.PairCredentials.generate()
        creds.write_server(new_tls_dir(gdir, Role.SECONDARY))
        pair_tls.write_client(creds.client_bundle(),
                              new_tls_dir(gdir, Role.PRIMARY))
    procs = [_spawn_host(Role.SECONDARY, gdir),
             _spawn_host(Role.PRIMARY, gdir)]

    def protected() -> bool:
        st = status_of(gdir, Role.PRIMARY)
        if st and st.last_committed_epoch >= 1:
            return True
        dead = [(role, p) for role, p in zip(ROLES[::-1], procs)
                if p.poll() is not None]
        # (UNPROTECTED with an error: its secondary refused it.)
        if dead or (st and (st.state is State.FAILED or (
                st.state is State.UNPROTECTED and st.error))):
            role = dead[0][0] if dead else Role.PRIMARY
            why = (st.error if st else '') or _host_log_tail(gdir, role)
            _kill_all(gdir, procs)
            raise UserError(f'protecting {spec.name} failed on the {role} '
                            f'side: {why} (logs in {gdir})')
        return False
    if wait_until(protected, opts.protect_timeout, interval=0.1):
        return gdir
    _kill_all(gdir, procs)
    raise UserError(f'{spec.name} was not protected within '
                    f'{opts.protect_timeout:.0f}s (logs in {gdir})')


def _kill_all(gdir: str, procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _require_guest(state_dir: str, name: str) -> str:
    gdir = guest_dir(state_dir, name)
    if not os.path.exists(os.path.join(gdir, 'guest.json')):
        raise UserError(f'no guest {name!r} in {state_dir}; see "mftvm '
                        f'protect --help"')
    return gdir


@dataclasses.dataclass(frozen=True)
class LocalGuestStatus(Record):
    """Both sides of a local guest, as ``mftvm status`` shows them.

    Each side is what its instance process says (None: not started);
    ``child_pids`` adds, per role of a running side, the processes its
    instance process owns (QEMU, the secondary's storage daemon), which
    only a reader on the same machine can see.
    """

    name: str = field(pattern=NAME_PATTERN)
    primary: Optional[InstanceStatus] = None
    secondary: Optional[InstanceStatus] = None
    child_pids: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def side(self, role: Role) -> Optional[InstanceStatus]:
        return self.primary if role is Role.PRIMARY else self.secondary


def _readable_status(gdir: str, role: Role) -> Optional[InstanceStatus]:
    """status_of(), or None for a status this version cannot read (a
    guest left behind by another version is not running here)."""
    try:
        return status_of(gdir, role)
    except ContractError:
        return None


def status(state_dir: str, name: str) -> LocalGuestStatus:
    gdir = _require_guest(state_dir, name)
    sides: dict[Role, Optional[InstanceStatus]] = {}
    children: dict[str, tuple[int, ...]] = {}
    for role in ROLES:
        st = status_of(gdir, role)
        if st is not None:
            try:
                live = control(gdir, role,
                               ControlRequest(op=ControlOp.STATUS),
                               timeout=5)
                if live.ok and live.status is not None:
                    st = dataclasses.replace(live.status, alive=True)
            except (OSError, ValueError):
                pass
            if st.alive:
                children[role.value] = tuple(_child_pids(st.host_pid))
        sides[role] = st
    return LocalGuestStatus(name=name, primary=sides[Role.PRIMARY],
                            secondary=sides[Role.SECONDARY],
                            child_pids=children)


def _child_pids(pid: Any) -> list[int]:
    """PIDs whose parent is ``pid`` (the processes a host owns)."""
    if not isinstance(pid, int):
        return []
    children = []
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        try:
            with open(f'/proc/{entry}/stat') as f:
                ppid = int(f.read().rsplit(') ', 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            children.append(int(entry))
    return sorted(children)


def failover(state_dir: str, name: str) -> dict[str, Any]:
    """Planned failover through the primary; a takeover by the secondary
    when the primary's host is gone. The secondary's status once it runs
    the guest (an InstanceStatus as a JSON object)."""
    gdir = _require_guest(state_dir, name)
    prim = _readable_status(gdir, Role.PRIMARY)
    request = ControlRequest(op=ControlOp.FAILOVER)
    try:
        if prim and prim.alive:
            reply = control(gdir, Role.PRIMARY, request)
        else:
            reply = control(gdir, Role.SECONDARY, request)
    except OSError:
        raise UserError(f'{name}: no running side answers; see "mftvm '
                        f'status {name}"') from None
    if not reply.ok:
        raise UserError(f'{name}: failover refused: {reply.error}')
    active: list[InstanceStatus] = []

    def done() -> bool:
        sec = status_of(gdir, Role.SECONDARY)
        if sec is not None and sec.state is State.ACTIVE:
            active.append(sec)
            return True
        if sec is None or sec.state in (State.LOST, State.STOPPED) \
                or not sec.alive:
            raise UserError(f'{name}: failover failed: '
                            f'{(sec and sec.reason) or "secondary gone"}')
        return False
    if wait_until(done, 60, interval=0.1):
        return active[0].to_dict()
    raise UserError(f'{name}: failover did not finish within 60s')


def stop(state_dir: str, name: str, timeout: float = 20.0) -> None:
    """Stop both sides; kill what does not stop in time."""
    gdir = _require_guest(state_dir, name)
    pids = []
    for role in ROLES:
        st = _readable_status(gdir, role)
        if st and st.alive and st.host_pid is not None:
            pids.append(st.host_pid)
            try:
                control(gdir, role, ControlRequest(op=ControlOp.STOP),
                        timeout=5)
            except (OSError, ValueError):
                pass

    def all_gone() -> bool:
        return not any(pid_alive(pid) for pid in pids)
    wait_until(all_gone, timeout)
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    # A host killed (here, or before) could not remove its guest RAM file
    # from /dev/shm. Once neither host runs, nothing maps it any more
    # (each QEMU dies with its host).
    if wait_until(all_gone, 5):
        for role in ROLES:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(vm.ram_path(name, role))
