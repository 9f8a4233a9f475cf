"""Operations on standalone protected guests: protect, status, failover, stop.

These are what the ``mftvm`` CLI calls. A guest lives in
``<state-dir>/<name>/``; its two sides run as host processes
(:mod:`mftvm_openstack.instance.host`) started detached, so the CLI can
return once the guest is protected::

    spec = make_spec('vm0', kernel=..., initrd=..., disk=...)
    guest_dir = protect(spec, ProtectOptions(), state_dir)
    status(state_dir, 'vm0')      # {'primary': {...}, 'secondary': {...}}
    stop(state_dir, 'vm0')

Every user mistake is a :class:`UserError` with a one-line message that
says what to do; nothing is left running when protect() fails.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Optional

from mftvm_openstack.ft import disk as ft_disk
from mftvm_openstack.ft import pair, trackers, vm
from mftvm_openstack.instance.client import control, pid_alive, read_status

ROLES = ('primary', 'secondary')
NAME_RE = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$')


class UserError(Exception):
    """A mistake the user can fix; the message says how."""


@dataclasses.dataclass
class ProtectOptions:
    epoch_ms: int = 200
    #: how long an epoch may run while the guest sends nothing (no client
    #: waits on it); never less than epoch_ms, 0: always epoch_ms
    idle_epoch_ms: int = 1000
    tracker: str = 'auto'
    disk_sync: str = ft_disk.DEFAULT_DISK_SYNC
    detect_timeout: float = 1.0
    #: seconds the guest runs unprotected before protection starts (the
    #: initial sync then copies a live guest's disk)
    start_delay: float = 0.0
    protect_timeout: float = 180.0


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
        raise UserError(f'--nic {text!r}: only "user" networking is '
                        f'supported, e.g. user,hostfwd=tcp:127.0.0.1:8080-:80')
    forwards = []
    for part in parts[1:]:
        m = re.fullmatch(r'hostfwd=tcp:([0-9.]*):(\d+)-:(\d+)', part)
        if not m:
            raise UserError(f'--nic: cannot parse {part!r}; write '
                            f'hostfwd=tcp:127.0.0.1:HOSTPORT-:GUESTPORT')
        addr = m.group(1) or '127.0.0.1'
        forwards.append(vm.HostForward(addr, int(m.group(2)),
                                       int(m.group(3))))
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
              smp: int = 1, nic: Optional[str] = None) -> vm.GuestSpec:
    """Validate the user's guest description and build its spec."""
    if not NAME_RE.match(name):
        raise UserError(f'guest name {name!r}: use letters, digits, "_", '
                        f'"." and "-" (at most 63)')
    try:
        vm.qemu_version()
        vm.check_kernel(kernel)
        if not os.path.isfile(initrd):
            raise UserError(f'initrd {initrd} does not exist')
        fmt, size = vm.probe_disk(disk)
    except vm.VMError as exc:
        raise UserError(str(exc)) from None
    if not 16 <= memory_mib <= 65536:
        raise UserError(f'--memory {memory_mib}: give 16 to 65536 MiB')
    if not 1 <= smp <= 64:
        raise UserError(f'--smp {smp}: give 1 to 64')
    forwards = parse_nic(nic) if nic else ()
    for fwd in forwards:
        check_port_free(fwd)
    return vm.GuestSpec(
        name=name, kernel=os.path.abspath(kernel),
        initrd=os.path.abspath(initrd), disk=os.path.abspath(disk),
        append=append if append is not None else 'console=ttyS0 quiet',
        disk_format=fmt, disk_size=size, memory_mib=memory_mib, smp=smp,
        forwards=forwards, accel=vm.probe_accelerator())


def _check_state_dir(state_dir: str) -> None:
    try:
        os.makedirs(state_dir, exist_ok=True)
    except OSError as exc:
        raise UserError(f'state dir {state_dir}: {exc.strerror}; give a '
                        f'writable --state-dir') from None
    if not os.access(state_dir, os.W_OK | os.X_OK):
        raise UserError(f'state dir {state_dir} is not writable; give a '
                        f'writable --state-dir')


def _check_options(opts: ProtectOptions) -> None:
    low, high = pair.EPOCH_MS_RANGE
    if not low <= opts.epoch_ms <= high:
        raise UserError(f'--epoch-ms {opts.epoch_ms}: give {low} to {high}')
    low, high = pair.IDLE_EPOCH_MS_RANGE
    if not low <= opts.idle_epoch_ms <= high:
        raise UserError(f'--idle-epoch-ms {opts.idle_epoch_ms}: give {low} '
                        f'to {high} (0: every epoch lasts --epoch-ms)')
    try:
        trackers.tracker_class(opts.tracker)
    except trackers.TrackerError as exc:
        raise UserError(f'--tracker: {exc}') from None
    if opts.disk_sync not in ft_disk.DISK_SYNCS:
        raise UserError(f'--disk-sync {opts.disk_sync!r}: use one of '
                        f'{", ".join(ft_disk.DISK_SYNCS)}')


def guest_dir(state_dir: str, name: str) -> str:
    return os.path.join(state_dir, name)


def _spawn_host(role: str, gdir: str) -> subprocess.Popen[bytes]:
    log = open(os.path.join(gdir, f'{role}-host.log'), 'ab')
    with log:
        return subprocess.Popen(
            [sys.executable, '-m', 'mftvm_openstack.instance', role,
             gdir], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            start_new_session=True)






def _host_log_tail(gdir: str, role: str) -> str:
    try:
        with open(os.path.join(gdir, f'{role}-host.log'), 'rb') as f:
            lines = f.read()[-8192:].decode(errors='replace').splitlines()
    except OSError:
        return ''
    errors = [ln for ln in lines if ' ERROR ' in ln]
    return (errors or lines or [''])[-1].strip()


def protect(spec: vm.GuestSpec, opts: ProtectOptions,
            state_dir: str,
            host_options: Optional[dict[str, Any]] = None) -> str:
    """Start both sides of ``spec`` and return once it is protected.

    ``host_options`` adds options only the host processes read (see
    ``standalone.host.HOST_DEFAULTS``), e.g. ``libvirt_uri``.
    """
    _check_options(opts)
    _check_state_dir(state_dir)
    gdir = guest_dir(state_dir, spec.name)
    if any((s := read_status(gdir, role)) and s['alive'] for role in ROLES):
        raise UserError(f'guest {spec.name} is already running; stop it '
                        f'with "mftvm stop {spec.name}" first')
    shutil.rmtree(gdir, ignore_errors=True)
    os.makedirs(gdir)
    with open(os.path.join(gdir, 'guest.json'), 'w') as f:
        json.dump({'spec': spec.to_json(),
                   'options': {**dataclasses.asdict(opts),
                               **(host_options or {})}}, f, indent=1)
    procs = [_spawn_host('secondary', gdir), _spawn_host('primary', gdir)]
    deadline = time.monotonic() + opts.protect_timeout
    while time.monotonic() < deadline:
        st = read_status(gdir, 'primary')
        if st and st.get('last_committed_epoch', 0) >= 1:
            return gdir
        dead = [(role, p) for role, p in zip(ROLES[::-1], procs)
                if p.poll() is not None]
        if dead or (st and st.get('state') == 'failed'):
            role = dead[0][0] if dead else 'primary'
            why = (st or {}).get('error') or _host_log_tail(gdir, role)
            _kill_all(gdir, procs)
            raise UserError(f'protecting {spec.name} failed on the {role} '
                            f'side: {why} (logs in {gdir})')
        time.sleep(0.1)
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


def status(state_dir: str, name: str) -> dict[str, Any]:
    gdir = _require_guest(state_dir, name)
    result: dict[str, Any] = {'name': name}
    for role in ROLES:
        st = read_status(gdir, role)
        if st is not None:
            try:
                live = control(gdir, role, 'status', timeout=5)
                if live.get('ok'):
                    st = dict(live['status'], alive=True)
            except (OSError, ValueError):
                pass
        result[role] = st
    sec = result.get('secondary') or {}
    if sec.get('alive'):
        qsd = _child_pids(sec.get('host_pid'))
        sec['child_pids'] = qsd
    return result


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
    when the primary's host is gone."""
    gdir = _require_guest(state_dir, name)
    prim = read_status(gdir, 'primary')
    try:
        if prim and prim['alive']:
            reply = control(gdir, 'primary', 'failover')
        else:
            reply = control(gdir, 'secondary', 'failover')
    except OSError:
        raise UserError(f'{name}: no running side answers; see "mftvm '
                        f'status {name}"') from None
    if not reply.get('ok'):
        raise UserError(f'{name}: failover refused: {reply.get("error")}')
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        sec = read_status(gdir, 'secondary') or {}
        if sec.get('state') == 'active':
            return sec
        if sec.get('state') in ('lost', 'stopped') or not sec.get('alive'):
            raise UserError(f'{name}: failover failed: '
                            f'{sec.get("reason") or "secondary gone"}')
        time.sleep(0.1)
    raise UserError(f'{name}: failover did not finish within 60s')


def stop(state_dir: str, name: str, timeout: float = 20.0) -> None:
    """Stop both sides; kill what does not stop in time."""
    gdir = _require_guest(state_dir, name)
    pids = []
    for role in ('primary', 'secondary'):
        st = read_status(gdir, role)
        if st and st['alive']:
            pids.append(st['host_pid'])
            try:
                control(gdir, role, 'stop', timeout=5)
            except (OSError, ValueError):
                pass
    deadline = time.monotonic() + timeout
    for pid in pids:
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    # A host killed (here, or before) could not remove its guest RAM file
    # from /dev/shm. Once neither host runs, nothing maps it any more
    # (each QEMU dies with its host).
    deadline = time.monotonic() + 5
    while any(pid_alive(pid) for pid in pids) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    if not any(pid_alive(pid) for pid in pids):
        for role in ('primary', 'secondary'):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(vm.ram_path(name, role))
