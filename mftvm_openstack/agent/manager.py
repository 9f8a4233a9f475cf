"""The agent's manager: the FT guests of one hypervisor.

Each guest side runs in its own *instance process*
(:mod:`mftvm_openstack.instance`), started detached so that it
outlives the agent: an agent that restarts — even after SIGKILL — finds
its guests where it left them, in ``[agent] state_path``::

    instances/<name>/guest.json    spec and options
    instances/<name>/record.json   role, peer, pair
    instances/<name>/<role>/       sockets, logs, status.json
    ended/<name>/                  the last ended instance, for reading

The manager never starts a guest's QEMU itself, and never restarts one: a
guest runs only where an instance process won its fence. What the manager
adds is the cluster view — it asks a peer's agent to prepare a secondary
(over :mod:`~mftvm_openstack.agent.rpcapi`), tells its own instance
processes whom to protect the guest onto, and re-protects a guest that
runs unprotected (after a failover, or after its secondary was lost)
onto the next peer in ``[agent] peers``::

    manager = AgentManager()            # reads CONF
    manager.protect('vm0', GuestSpec(...), ProtectionOptions(),
                    secondary_host='hv2')
    manager.status('vm0')               # InstanceStatus(...).to_dict()
    manager.periodic()                  # every [agent] monitor_interval

What the manager answers is the contract's: a status is an
:class:`~mftvm_openstack.contract.status.InstanceStatus` (with
``instance``, ``host`` and ``peer`` filled in), a failover a
:class:`~mftvm_openstack.contract.spec.FailoverResult`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, Optional

from oslo_config import cfg

from mftvm_openstack import conf as mftvm_conf
from mftvm_openstack import fencing
from mftvm_openstack.agent import exception
from mftvm_openstack.contract.control import (
    ControlOp,
    ControlReply,
    ControlRequest,
)
from mftvm_openstack.contract.options import HostOptions
from mftvm_openstack.contract.record import ContractError
from mftvm_openstack.contract.spec import (
    ClientCredentials,
    FailoverResult,
    GuestSpec,
    PreparedSecondary,
    ProtectionOptions,
)
from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import InstanceStatus
from mftvm_openstack.files import (
    NotAllowed,
    file_in,
    private_dir,
    write_json_atomic,
)
from mftvm_openstack.ft import capacity, pair_tls, vm
from mftvm_openstack.instance.client import control, pid_alive, status_of
from mftvm_openstack.instance.config import FENCE_URL_ENV, new_tls_dir
from mftvm_openstack.waiting import wait_until

LOG = logging.getLogger(__name__)

#: states in which the guest runs here, unprotected
RUNNING_UNPROTECTED = frozenset({State.UNPROTECTED, State.ACTIVE})
#: how long a failover asked of a standby secondary may take to resume
#: the guest before the agent answers without its duration
FAILOVER_WAIT = 20.0


def _read_json(path: str) -> Optional[dict[str, Any]]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


#: what of an ended instance's directory is kept: its logs and its JSON
#: records (status, options with secrets masked), never its data
KEPT_WHEN_ENDED = ('.log', '.json')


def _move_logs(src: str, dst: str) -> None:
    """Move the files of ``src`` named ``*.log`` or ``*.json`` to the same
    places under ``dst`` (0700); leave the rest where it is."""
    for dirpath, _, names in os.walk(src):
        for name in names:
            if not name.endswith(KEPT_WHEN_ENDED):
                continue
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                continue
            to = os.path.join(dst, os.path.relpath(path, src))
            try:
                private_dir(os.path.dirname(to))
                os.rename(path, to)
            except OSError as exc:
                LOG.warning('cannot keep %s: %s', path, exc)


def _ran_from_replica(status: InstanceStatus) -> bool:
    """Whether this secondary resumed the guest from its replica: then
    the replica is the guest's disk, perhaps its only current copy."""
    return status.takeover is not None and \
        status.takeover.resumed is not None


def _only_copy(status: InstanceStatus, record: dict[str, Any]) -> bool:
    """Whether an ended instance's replica may be the guest's only copy:
    the guest ran here from it, and nobody said since that its disks
    were moved elsewhere (:meth:`AgentManager.disk_settled`)."""
    return _ran_from_replica(status) and not record.get('disk_settled')


class Instance:
    """One guest's directory on this host, and its instance process."""

    def __init__(self, root: str, name: str) -> None:
        self.name = name
        self.dir = os.path.join(root, name)

    def keep_credentials(self,
                         creds: Optional[ClientCredentials]) -> None:
        """Keep the primary's half of its pair's credentials (from the
        secondary's prepare_secondary reply) where it reads them."""
        if creds is not None:
            pair_tls.write_client(creds, new_tls_dir(self.dir, Role.PRIMARY))

    @property
    def record(self) -> dict[str, Any]:
        return _read_json(os.path.join(self.dir, 'record.json')) or {}

    def save_record(self, **changes: Any) -> dict[str, Any]:
        record = {**self.record, **changes}
        write_json_atomic(os.path.join(self.dir, 'record.json'), record)
        return record

    @property
    def role(self) -> Optional[Role]:
        role = self.record.get('role')
        return Role(role) if role in tuple(Role) else None

    def live_status(self) -> Optional[InstanceStatus]:
        """The instance process' last published status (``alive`` says
        whether it still runs); STARTING until it publishes one."""
        role = self.role
        if role is None:
            return None
        status = status_of(self.dir, role)
        if status is None:
            pid = self.record.get('pid')
            pid = pid if isinstance(pid, int) else None
            return InstanceStatus(role=role, state=State.STARTING,
                                  host_pid=pid, alive=pid_alive(pid))
        return status

    def control(self, op: ControlOp, timeout: float = 30.0,
                **args: Any) -> ControlReply:
        role = self.role
        if role is None:
            raise ConnectionError(f'{self.name}: no instance process')
        return control(self.dir, role, ControlRequest(op=op, **args),
                       timeout)

    def spawn(self, role: Role,
              secrets: Optional[dict[str, str]] = None) -> int:
        """Start its instance process as ``role``; ``secrets`` go into
        its environment (never into a file or its argv)."""
        log = open(os.path.join(self.dir, f'{role}-host.log'), 'ab')
        with log:
            proc = subprocess.Popen(
                [sys.executable, '-m', 'mftvm_openstack.instance',
                 role, self.dir], stdin=subprocess.DEVNULL, stdout=log,
                stderr=log, start_new_session=True,
                env={**os.environ, **(secrets or {})})
        self.save_record(role=role, pid=proc.pid)
        # Reap it in the background: a zombie would look alive.
        threading.Thread(target=proc.wait, daemon=True).start()
        return proc.pid


class AgentManager:
    """Protects the guests of this host; see the module docstring."""

    def __init__(self, conf: cfg.ConfigOpts = mftvm_conf.CONF,
                 agents: Any = None) -> None:
        self.conf = conf
        self.host: str = conf.agent.host
        self.root = os.path.join(conf.agent.state_path, 'instances')
        self._agents = agents
        self._lock = threading.RLock()
        self._busy: set[str] = set()       # instances being re-protected
        self._last_try: dict[str, float] = {}
        #: instance -> why its last re-protection failed: a failure is
        #: logged as a warning when its reason changes, not at every try
        #: (with no ``[agent] peers``, as under Nova, every try fails)
        self._reprotect_failed: dict[str, str] = {}
        #: called with every periodic look at the instances (the
        #: notifications and metrics: agent/watch.py)
        self.observers: list[Callable[[list[InstanceStatus]], None]] = []

    # -- lifecycle --

    def start(self) -> None:
        self._private_tree()
        found = self.list()
        LOG.info('agent %s found %d instance(s): %s', self.host, len(found),
                 ', '.join(f'{i["instance"]} ({i["state"]})'
                           for i in found) or 'none')

    def stop(self) -> None:
        """The agent stops; its instance processes (and guests) run on."""

    @property
    def agents(self) -> Any:
        if self._agents is None:
            from mftvm_openstack.agent import rpcapi
            self._agents = rpcapi.AgentAPI(rpcapi.get_transport(self.conf))
        return self._agents

    def _private_tree(self) -> None:
        """state_path and its instances/: 0700, they hold guests' disks
        and RAM."""
        private_dir(self.conf.agent.state_path)
        private_dir(self.root)

    def _instance(self, name: str, must_exist: bool = True) -> Instance:
        inst = Instance(self.root, name)
        if must_exist and not os.path.exists(
                os.path.join(inst.dir, 'record.json')):
            raise exception.InstanceNotFound(instance=name)
        return inst

    # -- options --

    def host_options(self, options: ProtectionOptions,
                     instance: str = '') -> HostOptions:
        """guest.json options: the request's, then this host's settings
        (checked as the instance process will check them)."""
        c = self.conf
        fence_dir = None
        if not c.fencing.backend_url:
            fence_dir = os.path.join(c.fencing.lock_path, instance)

        def given(value: Any, default: Any) -> Any:
            return default if value is None else value
        return HostOptions.from_dict({
            'epoch_ms': given(options.epoch_ms, c.ft.epoch_ms),
            'idle_epoch_ms': given(options.idle_epoch_ms,
                                   c.ft.idle_epoch_ms),
            'disk_sync': given(options.disk_sync, c.ft.disk_sync),
            'tracker': given(options.tracker, c.ft.tracker),
            'start_delay': given(options.start_delay, 0.0),
            'detect_timeout': (c.agent.heartbeat_interval
                               * c.agent.heartbeat_misses),
            'heartbeat_interval': c.agent.heartbeat_interval,
            'ack_timeout': c.ft.ack_timeout,
            'max_held_epochs': c.ft.max_held_epochs,
            'max_held_bytes': c.ft.max_held_bytes,
            'adaptive_epochs': c.ft.adaptive_epochs,
            'output_batch_ms': c.ft.output_batch_ms,
            'min_epoch_ms': c.ft.min_epoch_ms,
            'max_pause_percent': c.ft.max_pause_percent,
            'hang_timeout': c.agent.hang_timeout,
            'replica_timeout': c.agent.replica_timeout,
            # for people to read: the instance process gets the URL
            # itself from instance_secrets()
            'fence_url': (fencing.mask_url(c.fencing.backend_url)
                          if c.fencing.backend_url else None),
            'fence_dir': fence_dir,
            'fence_lease': c.fencing.lease,
            'fence_acquire_timeout': c.fencing.acquire_timeout,
            'member': self.host,
            'ram_tag': f'{self.host}',
            'libvirt_uri': c.agent.libvirt_uri,
            'allowed_bridges': list(c.agent.allowed_bridges),
            'tls': c.replication.tls,
        }, 'host options')

    def instance_secrets(self) -> dict[str, str]:
        """What an instance process gets in its environment, not in
        guest.json: the fencing URL with its password."""
        url = self.conf.fencing.backend_url
        return {FENCE_URL_ENV: url} if url else {}

    def new_instance_dir(self, name: str, spec: GuestSpec,
                         options: HostOptions) -> Instance:
        """A fresh directory for ``name`` with its guest.json: what an
        instance process started there runs. Conflict if one runs
        there; InvalidRequest if ``spec`` says nothing to run."""
        inst = self._instance(name, must_exist=False)
        status = inst.live_status()
        if status is not None and status.alive:
            raise exception.Conflict(
                instance=name, reason=f'it already runs here as '
                f'{inst.role} ({status.state})')
        try:
            spec.check_runnable()
        except ContractError as exc:
            raise exception.InvalidRequest(field=exc.field,
                                           reason=exc.reason) from None
        shutil.rmtree(inst.dir, ignore_errors=True)
        self._private_tree()
        private_dir(inst.dir)
        if options.fence_dir:
            private_dir(options.fence_dir)
        write_json_atomic(os.path.join(inst.dir, 'guest.json'),
                          {'spec': spec.to_dict(),
                           'options': options.to_dict()})
        return inst

    def check_disk(self, spec: GuestSpec) -> None:
        """InvalidRequest unless the disk a caller named (for a guest
        that is not a libvirt domain) is a regular file in ``[agent]
        disk_dirs``, reached without a symlink (:func:`.files.file_in`)."""
        if spec.domain:
            return      # the disk is the domain's, as libvirt has it
        for i, (path, _, _) in enumerate(spec.all_disks):
            where = 'spec.disk' if i == 0 else f'spec.more_disks[{i - 1}]'
            try:
                file_in(path, self.conf.agent.disk_dirs)
            except NotAllowed as exc:
                raise exception.InvalidRequest(
                    field=where, reason=f'{exc} ([agent] disk_dirs)') \
                    from None
            except OSError as exc:
                raise exception.InvalidRequest(
                    field=where, reason=f'{path}: {exc.strerror}') from None

    def check_capacity(self, instance: str, spec: GuestSpec,
                       role: Role) -> None:
        """InsufficientCapacity unless this host has room for ``role``'s
        side of the guest: the RAM file of a guest whose QEMU is ours
        (a libvirt domain's is libvirt's), and on a secondary, the RAM
        replica and the disk replica (see :mod:`.ft.capacity`)."""
        needs = []
        if role is Role.SECONDARY or not spec.domain:
            needs.append(capacity.Need(
                vm.ram_dir(), spec.memory_bytes,
                f'guest {instance} RAM ({role})'))
        if role is Role.SECONDARY:
            needs.append(capacity.Need(
                os.path.join(self.root, instance, role, 'disk'),
                sum(capacity.replica_disk_bytes(size)
                    for _, _, size in spec.all_disks),
                f'guest {instance} disk replica'))
        try:
            capacity.check(needs)
        except capacity.CapacityError as exc:
            LOG.warning('%s: refused: %s', instance, exc)
            raise exception.InsufficientCapacity(
                host=self.host, what=exc.what, directory=exc.directory,
                needed_mib=exc.needed / 2**20,
                available_mib=exc.available / 2**20) from None

    # -- RPC API --

    def prepare_secondary(self, instance: str, spec: GuestSpec,
                          options: ProtectionOptions,
                          primary_host: str) -> dict[str, Any]:
        my_ip = self.conf.agent.my_ip
        opts = dataclasses.replace(self.host_options(options, instance),
                                   listen=f'tcp:{my_ip}:0', nbd_host=my_ip)
        self.check_capacity(instance, spec, Role.SECONDARY)
        creds = None
        if opts.tls:
            # This pair's own CA: only the primary that gets the client
            # half (in this RPC's reply) can feed or read this replica.
            creds = pair_tls.PairCredentials.generate()
        with self._lock:
            inst = self.new_instance_dir(instance, spec, opts)
            if creds is not None:
                creds.write_server(new_tls_dir(inst.dir, Role.SECONDARY))
            inst.save_record(peer=primary_host, created=time.time())
            inst.spawn(Role.SECONDARY, self.instance_secrets())
        listening: list[str] = []

        def ready() -> bool:
            st = inst.live_status()
            if st is not None and st.listen:
                listening.append(st.listen)
                return True
            return st is not None and st.alive is False
        if wait_until(ready, timeout=30) and listening:
            LOG.info('%s: secondary for %s ready at %s', instance,
                     primary_host, listening[0])
            return PreparedSecondary(
                host=self.host, data_address=listening[0],
                credentials=None if creds is None
                else creds.client_bundle()).to_dict()
        # Its logs say why: kept under ended/, which the message names
        # (its directory itself goes, with what data it made).
        kept = self._discard(inst)
        raise exception.Conflict(instance=instance,
                                 reason='the secondary process did not '
                                 'start; see the logs in ' + kept)

    def protect(self, instance: str, spec: GuestSpec,
                options: ProtectionOptions,
                secondary_host: Optional[str]) -> dict[str, Any]:
        inst = self._instance(instance, must_exist=False)
        status = inst.live_status()
        if status is not None and status.alive:
            if status.state not in RUNNING_UNPROTECTED:
                raise exception.Conflict(
                    instance=instance, reason=f'it is {status.state}'
                    f' here, not running unprotected')
            self.reprotect(instance, prefer=secondary_host)
            return self._wait_protected(inst)
        self.check_disk(spec)
        self.check_capacity(instance, spec, Role.PRIMARY)
        opts = self.host_options(options, instance)
        pair_id = uuid.uuid4().hex[:12]
        target, address, creds = self._prepare_peer(
            instance, spec, opts, prefer=secondary_host, last=())
        opts = dataclasses.replace(opts, secondary=address, pair_id=pair_id)
        with self._lock:
            inst = self.new_instance_dir(instance, spec, opts)
            inst.keep_credentials(creds)
            inst.save_record(peer=target, pair_id=pair_id,
                             created=time.time(), auto_reprotect=True)
            inst.spawn(Role.PRIMARY, self.instance_secrets())
        return self._wait_protected(inst)

    def _wait_protected(self, inst: Instance) -> dict[str, Any]:
        def settled() -> bool:
            st = inst.live_status()
            if st is None:
                return False
            if st.counted_state is State.PROTECTED:
                return True
            if st.state.final or st.alive is False:
                raise exception.Conflict(
                    instance=inst.name, reason=f'protection failed: '
                    f'{st.error or st.state}')
            if st.state is State.UNPROTECTED and st.error:
                raise exception.Conflict(instance=inst.name,
                                         reason=st.error)
            return False
        if wait_until(settled, timeout=self.conf.agent.protect_timeout,
                      interval=0.1):
            return self.status(inst.name)
        raise exception.Conflict(instance=inst.name,
                                 reason='not protected within '
                                 f'{self.conf.agent.protect_timeout:.0f}s')

    def candidates(self, prefer: Optional[str],
                   last: tuple[str, ...]) -> list[str]:
        """Peers to ask, in order: ``prefer``, then ``[agent] peers``;
        hosts in ``last`` (the one just lost) only after all others."""
        hosts = ([prefer] if prefer else []) + list(self.conf.agent.peers)
        out: list[str] = []
        for h in hosts:
            if h and h != self.host and h not in out:
                out.append(h)
        out.sort(key=lambda h: h in last)     # stable: keeps the order
        return out

    def _prepare_peer(self, instance: str, spec: GuestSpec,
                      options: HostOptions, prefer: Optional[str],
                      last: tuple[str, ...]) \
            -> tuple[str, str, Optional[ClientCredentials]]:
        """Ask the first willing peer for a secondary: (host, address,
        the primary's pair credentials).

        ``options`` are this side's guest.json options; the secondary
        needs only those that shape the data it receives. A peer whose
        ``[replication] tls`` differs from this side's is passed over:
        neither side downgrades the other.
        """
        want_tls = options.tls
        request = ProtectionOptions(epoch_ms=options.epoch_ms,
                                    disk_sync=options.disk_sync,
                                    tracker=options.tracker)
        errors = []
        for host in self.candidates(prefer, last):
            try:
                reply = self.agents.prepare_secondary(
                    {}, host, instance, spec, request, self.host)
                ready = PreparedSecondary.from_dict(reply,
                                                    'prepare_secondary')
                if ready.host != host:
                    # The guest's memory goes to whoever answered: only
                    # to the agent that was asked (the caller names a
                    # host, never an address).
                    raise exception.PeerUnreachable(
                        host=host, reason=f'the answer came from agent '
                        f'{ready.host}, not {host}')
                if (ready.credentials is not None) != want_tls:
                    self._tell(host, 'stop_instance', instance)
                    raise exception.Conflict(
                        instance=instance, reason=(
                            f'its [replication] tls is '
                            f'{"off" if want_tls else "on"}, here '
                            f'{"on" if want_tls else "off"}'))
                return host, ready.data_address, ready.credentials
            except Exception as exc:
                LOG.warning('%s: host %s cannot be the secondary: %s',
                            instance, host, exc)
                errors.append(f'{host}: {exc}')
        raise exception.PeerUnreachable(
            host=','.join(self.candidates(prefer, last)) or '(none)',
            reason='; '.join(errors) or 'no peer configured ([agent] '
            'peers) or named')

    def reprotect(self, instance: str,
                  prefer: Optional[str] = None) -> None:
        """Protect a guest that runs here unprotected onto a new peer."""
        inst = self._instance(instance)
        record = inst.record
        guest = _read_json(os.path.join(inst.dir, 'guest.json')) or {}
        spec = GuestSpec.from_json(guest.get('spec'))
        # (a guest.json from before pair TLS means tls on: see load())
        options, _ = HostOptions.load(guest.get('options', {}))
        # The host we lost is asked last: it is likely still down (but
        # it may be the only one left).
        last = (str(record.get('peer', '')),) if not prefer else ()
        target, address, creds = self._prepare_peer(
            instance, spec, options, prefer=prefer, last=last)
        pair_id = uuid.uuid4().hex[:12]
        # before the primary connects: it reads them then
        inst.keep_credentials(creds)
        reply = inst.control(ControlOp.PROTECT, secondary=address,
                             pair_id=pair_id)
        if not reply.ok:
            self._tell(target, 'stop_instance', instance)
            raise exception.Conflict(instance=instance,
                                     reason=reply.error or '?')
        inst.save_record(peer=target, pair_id=pair_id,
                         protected_since=time.time())
        LOG.info('%s: re-protecting onto %s', instance, target)

    def _tell(self, host: str, method: str, instance: str) -> None:
        try:
            getattr(self.agents, method)({}, host, instance)
        except Exception as exc:
            LOG.warning('%s: %s on %s failed: %s', instance, method, host,
                        exc)

    def unprotect(self, instance: str) -> dict[str, Any]:
        inst = self._instance(instance)
        reply = inst.control(ControlOp.UNPROTECT)
        if not reply.ok:
            raise exception.Conflict(instance=instance,
                                     reason=reply.error or '?')
        inst.save_record(auto_reprotect=False)
        peer = inst.record.get('peer')
        if peer:
            self._tell(peer, 'stop_instance', instance)
        return self.status(instance)

    def failover(self, instance: str) -> dict[str, Any]:
        """Take over here (a standby secondary: answers once the guest
        runs here, with how long that took) or hand the guest over to
        the peer (a protected primary). A :class:`FailoverResult`."""
        inst = self._instance(instance)
        st = inst.live_status()
        takeover = st is not None and st.role is Role.SECONDARY and \
            st.state is State.STANDBY
        reply = inst.control(ControlOp.FAILOVER,
                             timeout=30 if takeover else 60)
        if not reply.ok:
            raise exception.Conflict(instance=instance,
                                     reason=reply.error or '?')
        if not takeover:
            peer = inst.record.get('peer')
            return FailoverResult(instance=instance, host=self.host,
                                  runs_on=peer if isinstance(peer, str)
                                  else None).to_dict()
        ended: list[InstanceStatus] = []

        def resumed() -> bool:
            now = inst.live_status()
            if now is not None and (now.state.runs_guest
                                    or now.state.final):
                ended.append(now)
                return True
            return False
        wait_until(resumed, timeout=FAILOVER_WAIT)
        if ended and ended[0].state.final:
            raise exception.Conflict(
                instance=instance, reason=f'failover failed: '
                f'{ended[0].reason or ended[0].state}')
        return FailoverResult(
            instance=instance, host=self.host,
            runs_on=self.host if ended else None,
            failover_ms=ended[0].failover_ms if ended else None).to_dict()

    def stop_instance(self, instance: str) -> dict[str, Any]:
        try:
            inst = self._instance(instance)
        except exception.InstanceNotFound:
            # Ended here already. If it had run from its replica, its disk
            # was kept under ended/ (see _discard); whoever stops it now
            # (Nova's delete) is done with the guest: that copy goes too.
            if self._purge_ended(instance):
                return {'instance': instance, 'stopped': True}
            raise
        st = inst.live_status()
        if st is not None and st.alive:
            try:
                inst.control(ControlOp.STOP, timeout=20)
            except OSError:
                pass
            wait_until(lambda: not pid_alive(st.host_pid), timeout=20,
                       interval=0.1)
        self._discard(inst)
        return {'instance': instance, 'stopped': True}

    def disk_settled(self, instance: str) -> dict[str, Any]:
        """The guest that runs here from its replica (taken over) has its
        disks elsewhere now: Nova's driver copied them live into its
        instance directory and switched the guest onto them (see
        :mod:`mftvm_openstack.nova.settle`). The replica is nobody's disk
        any more, so when the instance ends here it goes like any other
        instance's data instead of being kept under ``ended/``; if the
        instance has ended already, what was kept of it goes now."""
        try:
            inst = self._instance(instance)
        except exception.InstanceNotFound:
            if self._purge_ended(instance):
                return {'instance': instance, 'disk_settled': True}
            raise
        try:
            inst.save_record(disk_settled=time.time())
        except FileNotFoundError:
            # it ended meanwhile, its directory moved to ended/
            self._purge_ended(instance)
        LOG.info('%s: its disks are settled elsewhere; its replica is not '
                 'kept when it ends', instance)
        return {'instance': instance, 'disk_settled': True}

    def _discard(self, inst: Instance, keep_data: bool = False) -> str:
        """Kill its instance process (if it still runs) and forget it.

        Its logs and records are kept; its disks, overlays, device state
        and RAM are deleted, unless ``keep_data``: then the whole directory
        is kept under ended/ (the last copy of a guest's disk). Returns
        where they are kept: ``ended/<name>``, the last per instance
        name (the next end of that name replaces it).
        """
        try:
            st = inst.live_status()
        except ContractError:       # what it said is unreadable: kill it
            st = None
        pid = st.host_pid if st is not None else inst.record.get('pid')
        if isinstance(pid, int) and pid_alive(pid):
            os.kill(pid, 9)
        with self._lock:        # nothing kept per instance outlives it
            self._last_try.pop(inst.name, None)
            self._reprotect_failed.pop(inst.name, None)
        # Its logs and records are kept (the last ones per instance) for
        # the operator to read; its disks, overlays and device state are
        # tenants' data and go.
        ended = os.path.join(self.conf.agent.state_path, 'ended',
                             inst.name)
        shutil.rmtree(ended, ignore_errors=True)
        private_dir(os.path.dirname(ended))
        if keep_data:
            LOG.warning('%s: keeping its disk in %s: the guest ran on it '
                        'here and may have no other copy', inst.name, ended)
            try:
                os.rename(inst.dir, ended)
            except OSError:
                LOG.exception('%s: cannot move it to %s', inst.name, ended)
        else:
            _move_logs(inst.dir, ended)
            shutil.rmtree(inst.dir, ignore_errors=True)
        # Its QEMU died with it (PDEATHSIG); its RAM file must go too.
        try:
            os.unlink(vm.ram_path(inst.name, self.host))
        except OSError:
            pass
        return ended

    def _purge_ended(self, name: str) -> bool:
        """Delete the data (not the logs and records) kept under
        ended/``name``; False if nothing of it was kept."""
        ended = os.path.join(self.conf.agent.state_path, 'ended', name)
        if not os.path.isdir(ended):
            return False
        for dirpath, _, names in os.walk(ended):
            for file in names:
                if not file.endswith(KEPT_WHEN_ENDED):
                    path = os.path.join(dirpath, file)
                    try:
                        os.unlink(path)
                    except OSError as exc:
                        LOG.warning('cannot delete %s: %s', path, exc)
        LOG.info('%s: the data kept when it ended is deleted', name)
        return True

    def instance_status(self, instance: str) -> InstanceStatus:
        """What the instance process says, with the agent's view added
        (``instance``, ``host``, ``peer``)."""
        inst = self._instance(instance)
        record = inst.record
        try:
            st = inst.live_status()
        except ContractError as exc:
            raise exception.Conflict(
                instance=instance, reason=f'its instance process '
                f'published a status this agent cannot read: {exc}') \
                from None
        if st is None:     # being created: no instance process yet
            raise exception.InstanceNotFound(instance=instance)
        peer = record.get('peer')
        return dataclasses.replace(
            st, instance=instance, host=self.host,
            peer=peer if isinstance(peer, str) else None)

    def status(self, instance: str) -> dict[str, Any]:
        return self.instance_status(instance).to_dict()

    def statuses(self) -> list[InstanceStatus]:
        """The status of every instance of this host; one that cannot
        be read is logged and left out."""
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            try:
                out.append(self.instance_status(name))
            except exception.InstanceNotFound:
                continue
            except exception.Conflict as exc:
                LOG.error('%s: %s', name, exc)
        return out

    def list(self) -> list[dict[str, Any]]:
        return [st.to_dict() for st in self.statuses()]

    # -- monitoring --

    def periodic(self) -> None:
        """Notice what changed, re-protect what runs unprotected."""
        statuses = self.statuses()
        for observe in self.observers:
            try:
                observe(statuses)
            except Exception:
                LOG.exception('an observer of the instances failed')
        for info in statuses:
            name = info.instance
            inst = self._instance(name)
            state = info.state
            if not info.alive:
                if state is not State.STARTING:
                    # Nothing runs here any more: the guest went on
                    # elsewhere (or is lost); keep no stale claim on it.
                    LOG.info('%s: instance process ended (%s); forgetting '
                             'it', name, state)
                    self._discard(inst,
                                  keep_data=_only_copy(info, inst.record))
                continue
            if state in RUNNING_UNPROTECTED and self.conf.agent.reprotect \
                    and inst.record.get('auto_reprotect', True):
                self._maybe_reprotect(name)

    def _maybe_reprotect(self, name: str) -> None:
        with self._lock:
            if name in self._busy:
                return
            last = self._last_try.get(name, 0.0)
            if time.monotonic() - last < \
                    self.conf.agent.reprotect_retry_interval:
                return
            self._busy.add(name)
            self._last_try[name] = time.monotonic()

        def run() -> None:
            try:
                self.reprotect(name)
            except Exception as exc:
                self._reprotect_failure(name, str(exc))
            else:
                with self._lock:
                    self._reprotect_failed.pop(name, None)
            finally:
                with self._lock:
                    self._busy.discard(name)
        threading.Thread(target=run, name=f'reprotect-{name}',
                         daemon=True).start()

    def _reprotect_failure(self, name: str, reason: str) -> None:
        """Log a failed re-protection: a warning the first time and
        whenever the reason changes, else at debug level (it is retried
        every ``[agent] reprotect_retry_interval`` seconds)."""
        with self._lock:
            same = self._reprotect_failed.get(name) == reason
            self._reprotect_failed[name] = reason
        log = LOG.debug if same else LOG.warning
        log('%s: cannot re-protect now (%s); retrying every %gs%s', name,
            reason, self.conf.agent.reprotect_retry_interval,
            '' if same else ' (logged again only if the reason changes)')
