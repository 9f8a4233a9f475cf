"""The agent's manager: the FT guests of one hypervisor.

Each guest side runs in its own *instance process*
(:mod:`mftvm_openstack.instance.host`), started detached so that it
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
    manager.protect('vm0', spec, {}, secondary_host='hv2')
    manager.status('vm0')               # {'role': 'primary', ...}
    manager.periodic()                  # every [agent] monitor_interval
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, Optional

from oslo_config import cfg

from mftvm_openstack import conf as mftvm_conf
from mftvm_openstack.agent import exception
from mftvm_openstack.ft import vm
from mftvm_openstack.instance.client import control, pid_alive

LOG = logging.getLogger(__name__)

#: instance-process phases in which the guest runs here, unprotected
RUNNING_UNPROTECTED = ('unprotected', 'active')
#: phases after which an instance process has nothing left to do
FINISHED = ('stopped', 'lost', 'failed', 'fenced')


def _write_json(path: str, data: Any) -> None:
    tmp = f'{path}.tmp'
    with open(tmp, 'w') as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: str) -> Optional[dict[str, Any]]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Instance:
    """One guest's directory on this host, and its instance process."""

    def __init__(self, root: str, name: str) -> None:
        self.name = name
        self.dir = os.path.join(root, name)

    @property
    def record(self) -> dict[str, Any]:
        return _read_json(os.path.join(self.dir, 'record.json')) or {}

    def save_record(self, **changes: Any) -> dict[str, Any]:
        record = {**self.record, **changes}
        _write_json(os.path.join(self.dir, 'record.json'), record)
        return record

    @property
    def role(self) -> str:
        return str(self.record.get('role', ''))

    def live_status(self) -> Optional[dict[str, Any]]:
        """The instance process' last published status; ``alive`` says
        whether it still runs."""
        role = self.role
        if not role:
            return None
        data = _read_json(os.path.join(self.dir, role, 'status.json'))
        if data is None:
            pid = self.record.get('pid')
            return {'state': 'starting', 'alive': pid_alive(pid),
                    'host_pid': pid}
        data['alive'] = pid_alive(data.get('host_pid'))
        return data

    def control(self, op: str, timeout: float = 30.0,
                **args: Any) -> dict[str, Any]:
        return control(self.dir, self.role, op, timeout, **args)

    def spawn(self, role: str) -> int:
        log = open(os.path.join(self.dir, f'{role}-host.log'), 'ab')
        with log:
            proc = subprocess.Popen(
                [sys.executable, '-m', 'mftvm_openstack.instance',
                 role, self.dir], stdin=subprocess.DEVNULL, stdout=log,
                stderr=log, start_new_session=True)
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

    # -- lifecycle --

    def start(self) -> None:
        os.makedirs(self.root, exist_ok=True)
        found = self.list()
        LOG.info('agent %s found %d instance(s): %s', self.host, len(found),
                 ', '.join(f'{i["instance"]} ({i.get("state")})'
                           for i in found) or 'none')

    def stop(self) -> None:
        """The agent stops; its instance processes (and guests) run on."""

    @property
    def agents(self) -> Any:
        if self._agents is None:
            from mftvm_openstack.agent import rpcapi
            self._agents = rpcapi.AgentAPI(rpcapi.get_transport(self.conf))
        return self._agents

    def _instance(self, name: str, must_exist: bool = True) -> Instance:
        inst = Instance(self.root, name)
        if must_exist and not os.path.exists(
                os.path.join(inst.dir, 'record.json')):
            raise exception.InstanceNotFound(instance=name)
        return inst

    # -- options --

    def _host_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """guest.json options: the request's, then this host's settings."""
        c = self.conf
        fence_dir = None
        if not c.fencing.backend_url:
            fence_dir = os.path.join(c.fencing.lock_path,
                                     options.get('instance', ''))
        return {
            'epoch_ms': options.get('epoch_ms', c.ft.epoch_ms),
            'idle_epoch_ms': options.get('idle_epoch_ms',
                                         c.ft.idle_epoch_ms),
            'disk_sync': options.get('disk_sync', c.ft.disk_sync),
            'tracker': options.get('tracker', c.ft.tracker),
            'start_delay': options.get('start_delay', 0.0),
            'detect_timeout': (c.agent.heartbeat_interval
                               * c.agent.heartbeat_misses),
            'heartbeat_interval': c.agent.heartbeat_interval,
            'hang_timeout': c.agent.hang_timeout,
            'replica_timeout': c.agent.replica_timeout,
            'fence_url': c.fencing.backend_url,
            'fence_dir': fence_dir,
            'fence_lease': c.fencing.lease,
            'fence_acquire_timeout': c.fencing.acquire_timeout,
            'member': self.host,
            'ram_tag': f'{self.host}',
            'libvirt_uri': c.agent.libvirt_uri,
        }

    def _new_dir(self, name: str, spec: dict[str, Any],
                 options: dict[str, Any]) -> Instance:
        inst = self._instance(name, must_exist=False)
        status = inst.live_status()
        if status is not None and status.get('alive'):
            raise exception.Conflict(
                instance=name, reason=f'it already runs here as '
                f'{inst.role} ({status.get("state")})')
        shutil.rmtree(inst.dir, ignore_errors=True)
        os.makedirs(inst.dir)
        if options.get('fence_dir'):
            os.makedirs(options['fence_dir'], exist_ok=True)
        try:
            vm.GuestSpec.from_json(spec)
        except Exception as exc:
            shutil.rmtree(inst.dir, ignore_errors=True)
            raise exception.InvalidRequest(field='spec',
                                           reason=str(exc)) from None
        _write_json(os.path.join(inst.dir, 'guest.json'),
                    {'spec': spec, 'options': options})
        return inst

    # -- RPC API --

    def prepare_secondary(self, instance: str, spec: dict[str, Any],
                          options: dict[str, Any],
                          primary_host: str) -> dict[str, Any]:
        opts = self._host_options({**options, 'instance': instance})
        my_ip = self.conf.agent.my_ip
        opts.update(listen=f'tcp:{my_ip}:0', nbd_host=my_ip)
        with self._lock:
            inst = self._new_dir(instance, spec, opts)
            inst.save_record(peer=primary_host, created=time.time())
            inst.spawn('secondary')
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            st = inst.live_status() or {}
            if st.get('listen'):
                LOG.info('%s: secondary for %s ready at %s', instance,
                         primary_host, st['listen'])
                return {'host': self.host, 'data_address': st['listen']}
            if not st.get('alive', True):
                break
            time.sleep(0.05)
        self._discard(inst)
        raise exception.Conflict(instance=instance,
                                 reason='the secondary process did not '
                                 'start; see ' + inst.dir)

    def protect(self, instance: str, spec: dict[str, Any],
                options: dict[str, Any],
                secondary_host: Optional[str]) -> dict[str, Any]:
        inst = self._instance(instance, must_exist=False)
        status = inst.live_status()
        if status is not None and status.get('alive'):
            if status.get('state') not in RUNNING_UNPROTECTED:
                raise exception.Conflict(
                    instance=instance, reason=f'it is {status.get("state")}'
                    f' here, not running unprotected')
            self.reprotect(instance, prefer=secondary_host)
            return self._wait_protected(inst)
        opts = self._host_options({**options, 'instance': instance})
        pair_id = uuid.uuid4().hex[:12]
        target, address = self._prepare_peer(instance, spec, opts,
                                             prefer=secondary_host,
                                             last=())
        opts.update(secondary=address, pair_id=pair_id)
        with self._lock:
            inst = self._new_dir(instance, spec, opts)
            inst.save_record(peer=target, pair_id=pair_id,
                             created=time.time(), auto_reprotect=True)
            inst.spawn('primary')
        return self._wait_protected(inst)

    def _wait_protected(self, inst: Instance) -> dict[str, Any]:
        deadline = time.monotonic() + self.conf.agent.protect_timeout
        while time.monotonic() < deadline:
            st = inst.live_status() or {}
            if st.get('state') == 'protected' and \
                    st.get('last_committed_epoch', 0) >= 1:
                return self.status(inst.name)
            if st.get('state') in FINISHED or not st.get('alive', True):
                raise exception.Conflict(
                    instance=inst.name, reason=f'protection failed: '
                    f'{st.get("error") or st.get("state")}')
            if st.get('state') == 'unprotected' and st.get('error'):
                raise exception.Conflict(instance=inst.name,
                                         reason=st['error'])
            time.sleep(0.1)
        raise exception.Conflict(instance=inst.name,
                                 reason='not protected within '
                                 f'{self.conf.agent.protect_timeout:.0f}s')

    def _candidates(self, prefer: Optional[str],
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

    def _prepare_peer(self, instance: str, spec: dict[str, Any],
                      options: dict[str, Any], prefer: Optional[str],
                      last: tuple[str, ...]) -> tuple[str, str]:
        """Ask the first willing peer for a secondary: (host, address)."""
        request = {k: options[k] for k in ('epoch_ms', 'disk_sync',
                                           'tracker')}
        errors = []
        for host in self._candidates(prefer, last):
            try:
                reply = self.agents.prepare_secondary(
                    {}, host, instance, spec, request, self.host)
                return host, str(reply['data_address'])
            except Exception as exc:
                LOG.warning('%s: host %s cannot be the secondary: %s',
                            instance, host, exc)
                errors.append(f'{host}: {exc}')
        raise exception.PeerUnreachable(
            host=','.join(self._candidates(prefer, last)) or '(none)',
            reason='; '.join(errors) or 'no peer configured ([agent] '
            'peers) or named')

    def reprotect(self, instance: str,
                  prefer: Optional[str] = None) -> None:
        """Protect a guest that runs here unprotected onto a new peer."""
        inst = self._instance(instance)
        record = inst.record
        guest = _read_json(os.path.join(inst.dir, 'guest.json')) or {}
        spec, options = guest.get('spec'), guest.get('options', {})
        # The host we lost is asked last: it is likely still down (but
        # it may be the only one left).
        last = (str(record.get('peer', '')),) if not prefer else ()
        target, address = self._prepare_peer(instance, spec or {}, options,
                                             prefer=prefer, last=last)
        pair_id = uuid.uuid4().hex[:12]
        reply = inst.control('protect', secondary=address, pair_id=pair_id)
        if not reply.get('ok'):
            self._tell(target, 'stop_instance', instance)
            raise exception.Conflict(instance=instance,
                                     reason=reply.get('error', '?'))
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
        reply = inst.control('unprotect')
        if not reply.get('ok'):
            raise exception.Conflict(instance=instance,
                                     reason=reply.get('error', '?'))
        inst.save_record(auto_reprotect=False)
        peer = inst.record.get('peer')
        if peer:
            self._tell(peer, 'stop_instance', instance)
        return self.status(instance)

    def failover(self, instance: str) -> dict[str, Any]:
        inst = self._instance(instance)
        st = inst.live_status() or {}
        if st.get('role') == 'secondary' and st.get('state') == 'standby':
            reply = inst.control('failover')
        else:
            reply = inst.control('failover', timeout=60)
        if not reply.get('ok'):
            raise exception.Conflict(instance=instance,
                                     reason=reply.get('error', '?'))
        return {'instance': instance, 'accepted': True}

    def stop_instance(self, instance: str) -> dict[str, Any]:
        inst = self._instance(instance)
        st = inst.live_status() or {}
        if st.get('alive'):
            try:
                inst.control('stop', timeout=20)
            except OSError:
                pass
            deadline = time.monotonic() + 20
            while pid_alive(st.get('host_pid')) and \
                    time.monotonic() < deadline:
                time.sleep(0.1)
        self._discard(inst)
        return {'instance': instance, 'stopped': True}

    def _discard(self, inst: Instance) -> None:
        st = inst.live_status() or {}
        pid = st.get('host_pid')
        if pid_alive(pid):
            os.kill(pid, 9)
        # Kept (the last one per instance) for the operator to read.
        ended = os.path.join(self.conf.agent.state_path, 'ended',
                             inst.name)
        shutil.rmtree(ended, ignore_errors=True)
        os.makedirs(os.path.dirname(ended), exist_ok=True)
        try:
            os.rename(inst.dir, ended)
        except OSError:
            shutil.rmtree(inst.dir, ignore_errors=True)
        # Its QEMU died with it (PDEATHSIG); its RAM file must go too.
        try:
            os.unlink(vm.ram_path(inst.name, self.host))
        except OSError:
            pass

    def status(self, instance: str) -> dict[str, Any]:
        inst = self._instance(instance)
        record = inst.record
        st = inst.live_status() or {}
        keys = ('role', 'state', 'epochs', 'last_committed_epoch',
                'pause_p50_ms', 'pause_p99_ms', 'failover_ms', 'error',
                'reason', 'qemu_pid', 'host_pid', 'alive', 'pair_id',
                'ms_since_last_ack', 'listen', 'lease_held', 'takeover')
        out = {k: st[k] for k in keys if k in st}
        out.update(instance=instance, host=self.host,
                   peer=record.get('peer'))
        return out

    def list(self) -> list[dict[str, Any]]:
        try:
            names = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            try:
                out.append(self.status(name))
            except exception.InstanceNotFound:
                continue
        return out

    # -- monitoring --

    def periodic(self) -> None:
        """Notice what changed, re-protect what runs unprotected."""
        for info in self.list():
            name = info['instance']
            inst = self._instance(name)
            state = info.get('state')
            if not info.get('alive'):
                if state != 'starting':
                    # Nothing runs here any more: the guest went on
                    # elsewhere (or is lost); keep no stale claim on it.
                    LOG.info('%s: instance process ended (%s); forgetting '
                             'it', name, state)
                    self._discard(inst)
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
                LOG.warning('%s: cannot re-protect now (%s); retrying in '
                            '%.0fs', name, exc,
                            self.conf.agent.reprotect_retry_interval)
            finally:
                with self._lock:
                    self._busy.discard(name)
        threading.Thread(target=run, name=f'reprotect-{name}',
                         daemon=True).start()
