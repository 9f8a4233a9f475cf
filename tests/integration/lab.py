"""A network-namespace lab: hosts, a partitionable network, broker, backend.

Every hypervisor "host" is its own Linux network namespace with a single
interface, ``eth0``, on a /24 lab network.  The other end of each host's
veth sits on a bridge in a third namespace, ``core``, which is also where
the RabbitMQ broker and the Redis coordination backend run.  The test
process (the root namespace) has its own leg on that bridge, so it can
open TCP connections to any host's address directly.  Everything is by
IP address; nothing needs name resolution.  Needs root and iproute2.
An etcd cluster (:class:`EtcdCluster`) runs one member per lab host that
you name for it, so a member can be partitioned away like any host.

Example::

    import sys

    import testtools

    from tests.integration import lab as ftlab

    class PartitionTest(testtools.TestCase):
        def test_h1_cut_off(self):
            lab = self.useFixture(ftlab.Lab(hosts=('h1', 'h2')))
            rabbit = self.useFixture(ftlab.RabbitMQ(lab))   # ~6-8 s
            redis = self.useFixture(ftlab.Redis(lab))
            agent = lab.popen('h1', [sys.executable, '-m', 'some.agent',
                                     '--transport-url', rabbit.url,
                                     '--backend-url', redis.url,
                                     '--listen', lab.ip('h1')])
            ...
            lab.link_down('h1')   # partition: h1 reaches no one
            lab.link_up('h1')     # heal
            lab.cut('h1', 'h2')   # only h1 and h2 lose each other
            lab.heal('h1', 'h2')
            lab.kill_all('h1')    # the host dies (SIGKILL, all processes)
            out = lab.run('h2', ['ip', '-br', 'addr'],
                          capture_output=True, text=True).stdout

A partition is silent (no RST, no ICMP back to the other side): the
broker notices a cut-off client only by AMQP heartbeats, so lower
oslo.messaging's ``heartbeat_timeout_threshold`` in agents under test.

Isolation and cleanup: namespace names, the subnet (10.77.N.0/24, N
chosen under a lock file so concurrent test processes never share one)
and the ports of root-namespace services are unique, so ``stestr
--concurrency 2`` is safe.  Every fixture removes all it made (processes
in its namespaces, the namespaces, the root-side veth, temp dirs) in its
cleanups, also when ``setUp`` fails halfway.  Processes started with
:meth:`Lab.popen` are reaped at cleanup, but close their pipes yourself.
A lab whose test process died before its cleanups ran (say, killed by a
timeout) is removed, processes and all, by the next ``Lab`` set-up.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import fixtures

from mftvm_openstack.instance.secondary import pid_exists

IP = shutil.which('ip') or '/usr/sbin/ip'
EPMD = shutil.which('epmd') or '/usr/bin/epmd'
REDIS_SERVER = shutil.which('redis-server') or '/usr/bin/redis-server'
ETCD = shutil.which('etcd') or '/usr/bin/etcd'
# The scripts under /usr/sbin su to the rabbitmq user and force its HOME
# and config; these run as the caller with our private environment.
RABBITMQ_SERVER = '/usr/lib/rabbitmq/bin/rabbitmq-server'
RABBITMQCTL = '/usr/lib/rabbitmq/bin/rabbitmqctl'

NET_PREFIX = '10.77'           # lab networks are NET_PREFIX.N.0/24
_LOCK_PATH = '/tmp/mftvm-lab.lock'
_CORE_OCTET = 1
_FIRST_HOST_OCTET = 11
_ROOT_OCTET = 254
_MAX_HOSTS = _ROOT_OCTET - _FIRST_HOST_OCTET
_HOST_NAME = re.compile(r'^[A-Za-z0-9_.-]{1,32}$')
_NS_NAME = re.compile(r'^ftl\d+p(\d+)-\S+')   # ftl<N>p<owner pid>-<host>
_counter = itertools.count()


def wait_for(predicate: Callable[[], Any], timeout: float,
             interval: float = 0.05, what: str = 'condition') -> Any:
    """Poll ``predicate`` until it returns a true value, and return it.

    Raises ``TimeoutError`` after ``timeout`` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f'timed out after {timeout}s waiting for '
                               f'{what}')
        time.sleep(interval)


def tcp_open(ip: str, port: int, timeout: float = 0.5) -> bool:
    """True when a TCP connection to ``ip:port`` succeeds (from here)."""
    try:
        with socket.create_connection((ip, port), timeout=timeout):
            return True
    except OSError:
        return False


def _run_ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([IP, *args], capture_output=True, text=True)
    if check and result.returncode:
        raise RuntimeError(f'ip {" ".join(args)} failed '
                           f'({result.returncode}): {result.stderr.strip()}')
    return result


@contextlib.contextmanager
def _subnet_lock():
    with open(_LOCK_PATH, 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _free_ports(count: int, host: str = '127.0.0.1') -> list[int]:
    """``count`` distinct TCP ports that are free on ``host`` right now."""
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _exited(proc: subprocess.Popen) -> bool:
    """Has ``proc`` exited?  Does not reap it (its pid stays reserved)."""
    if proc.returncode is not None:
        return True
    try:
        info = os.waitid(os.P_PID, proc.pid,
                         os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


def _stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM,
                  timeout: float = 10.0) -> None:
    """Signal ``proc``, give it ``timeout`` s, then SIGKILL its whole
    process group (it was started in a new session) and reap it."""
    if proc.returncode is not None:
        return
    if not _exited(proc):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, sig)
        deadline = time.monotonic() + timeout
        while not _exited(proc) and time.monotonic() < deadline:
            time.sleep(0.02)
    # The leader is at most a zombie here, so its pgid can't be reused.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _tail(path: str, lines: int = 30) -> str:
    try:
        with open(path, errors='replace') as f:
            text = f.read().splitlines()[-lines:]
    except OSError as e:
        return f'--- {path}: {e}'
    return f'--- {path}:\n' + '\n'.join(line[:300] for line in text)


def _reap_stale_labs() -> None:
    """Remove the namespaces (and their processes) of labs whose test
    process is dead, e.g. killed by a timeout before its cleanups ran."""
    listed = _run_ip('netns', 'list', check=False).stdout.split('\n')
    for line in listed:
        match = _NS_NAME.match(line)
        if not match or pid_exists(int(match.group(1))):
            continue
        ns = line.split()[0]
        for _ in range(100):
            pids = _run_ip('netns', 'pids', ns, check=False).stdout.split()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.02)
        _run_ip('netns', 'del', ns, check=False)


class Lab(fixtures.Fixture):
    """Network namespaces joined by a bridge in a 'core' namespace.

    After ``setUp``: ``ns(host)``, ``ip(host)``, ``core_ip``, ``root_ip``,
    ``subnet``, ``hosts``; run things with :meth:`popen` / :meth:`run`;
    partition with :meth:`link_down` / :meth:`link_up`; crash a host
    with :meth:`kill_all`.  ``'core'`` is accepted wherever a host is,
    except for the link methods.
    """

    def __init__(self, hosts: Sequence[str] = ('h1', 'h2', 'h3')) -> None:
        super().__init__()
        hosts = tuple(hosts)
        for host in hosts:
            if not isinstance(host, str) or not _HOST_NAME.match(host):
                raise ValueError(f'bad host name {host!r}')
        if 'core' in hosts or len(set(hosts)) != len(hosts):
            raise ValueError(f'host names must be unique and not "core": '
                             f'{hosts}')
        if len(hosts) > _MAX_HOSTS:
            raise ValueError(f'at most {_MAX_HOSTS} hosts')
        self.hosts: tuple[str, ...] = hosts

    # -- set-up and tear-down ---------------------------------------------

    def _setUp(self) -> None:
        if os.geteuid() != 0:
            raise RuntimeError('Lab needs root (network namespaces)')
        self._namespaces: dict[str, str] = {}   # host -> ns, as created
        self._ips: dict[str, str] = {}
        self._veths: dict[str, str] = {}        # host -> its veth in core
        self._procs: list[subprocess.Popen] = []
        self._ports: dict[int, itertools.count] = {}
        self._root_veth: Optional[str] = None
        self.addCleanup(self._teardown)
        with _subnet_lock():
            _reap_stale_labs()
            n = self._pick_subnet()
            net = self._net = f'{NET_PREFIX}.{n}'
            self.subnet = f'{net}.0/24'
            self.core_ip = f'{net}.{_CORE_OCTET}'
            self.root_ip = f'{net}.{_ROOT_OCTET}'
            self._ips['core'] = self.core_ip
            self._prefix = f'ftl{n}p{os.getpid()}'
            core = self._add_ns('core')
            # Once this veth holds root_ip, subnet N is taken for others.
            self._root_veth = f'ftl{n}r'
            _run_ip('link', 'add', self._root_veth, 'type', 'veth',
                    'peer', 'name', 'up0', 'netns', core)
            _run_ip('addr', 'add', f'{self.root_ip}/24',
                    'dev', self._root_veth)
        _run_ip('-n', core, 'link', 'add', 'br0', 'type', 'bridge')
        _run_ip('-n', core, 'addr', 'add', f'{self.core_ip}/24',
                'dev', 'br0')
        _run_ip('-n', core, 'link', 'set', 'br0', 'up')
        _run_ip('-n', core, 'link', 'set', 'up0', 'master', 'br0', 'up')
        _run_ip('link', 'set', self._root_veth, 'up')
        for index, host in enumerate(self.hosts):
            self._add_host(index, host)

    def _pick_subnet(self) -> int:
        """A free N for NET_PREFIX.N.0/24 (call with the lock held)."""
        addrs = _run_ip('-o', '-4', 'addr', 'show').stdout
        links = _run_ip('-o', 'link', 'show').stdout
        start = (os.getpid() * 7 + next(_counter)) % 253
        for i in range(253):
            n = 1 + (start + i) % 253
            if (f' {NET_PREFIX}.{n}.' not in addrs
                    and f' ftl{n}r@' not in links
                    and f' ftl{n}r:' not in links):
                return n
        raise RuntimeError(f'no free {NET_PREFIX}.N.0/24 lab subnet')

    def _add_ns(self, host: str) -> str:
        ns = f'{self._prefix}-{host}'
        _run_ip('netns', 'add', ns)
        self._namespaces[host] = ns
        _run_ip('-n', ns, 'link', 'set', 'lo', 'up')
        return ns

    def _add_host(self, index: int, host: str) -> None:
        core = self._namespaces['core']
        ns = self._add_ns(host)
        veth = f'v{index}'
        ip = f'{self._net}.{_FIRST_HOST_OCTET + index}'
        _run_ip('-n', core, 'link', 'add', veth, 'type', 'veth',
                'peer', 'name', 'eth0', 'netns', ns)
        self._veths[host] = veth
        _run_ip('-n', core, 'link', 'set', veth, 'master', 'br0', 'up')
        _run_ip('-n', ns, 'addr', 'add', f'{ip}/24', 'dev', 'eth0')
        _run_ip('-n', ns, 'link', 'set', 'eth0', 'up')
        self._ips[host] = ip

    def _teardown(self) -> None:
        errors: list[str] = []
        # Hosts first, core (the broker's home) last.
        order = list(reversed(self._namespaces.items()))
        for _, ns in order:
            try:
                self._kill_ns(ns, signal.SIGKILL)
            except Exception as e:   # keep tearing down, report at the end
                errors.append(str(e))
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        for _, ns in order:
            result = _run_ip('netns', 'del', ns, check=False)
            if result.returncode:
                errors.append(f'ip netns del {ns}: {result.stderr.strip()}')
        if self._root_veth:
            # Normally already gone with the core namespace.
            _run_ip('link', 'del', self._root_veth, check=False)
        if errors:
            raise RuntimeError('Lab cleanup: ' + '; '.join(errors))

    # -- addresses and names ----------------------------------------------

    def ns(self, host: str) -> str:
        """Namespace name of ``host`` (``'core'`` allowed)."""
        try:
            return self._namespaces[host]
        except KeyError:
            raise KeyError(f'no host {host!r} in this lab') from None

    def ip(self, host: str) -> str:
        """Address of ``host`` on the lab network (``'core'`` allowed)."""
        try:
            return self._ips[host]
        except KeyError:
            raise KeyError(f'no host {host!r} in this lab') from None

    def _core_port(self, base: int) -> int:
        """Next port from ``base`` for a service in the core namespace."""
        counter = self._ports.setdefault(base, itertools.count(base))
        return next(counter)

    # -- processes --------------------------------------------------------

    def _argv(self, host: str, argv: Sequence[Any]) -> list[str]:
        return [IP, 'netns', 'exec', self.ns(host),
                *(os.fspath(a) for a in argv)]

    @staticmethod
    def _kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs.setdefault('start_new_session', True)
        env = kwargs.get('env')
        if env is not None and 'PATH' not in env:
            kwargs['env'] = {**env,
                             'PATH': os.environ.get('PATH', os.defpath)}
        return kwargs

    def popen(self, host: str, argv: list[str],
              **kwargs: Any) -> subprocess.Popen:
        """Start ``argv`` inside ``host``'s namespace (``ip netns exec``).

        ``kwargs`` go to ``subprocess.Popen``; ``start_new_session``
        defaults to True; the environment is inherited (an explicit
        ``env`` without PATH gets ours).  The returned pid is the
        program's own (``ip`` execs it), and it is already inside the
        namespace when this returns.
        """
        proc = subprocess.Popen(self._argv(host, argv),
                                **self._kwargs(kwargs))
        self._procs.append(proc)
        self._wait_entered(proc, self.ns(host))
        return proc

    @staticmethod
    def _wait_entered(proc: subprocess.Popen, ns: str) -> None:
        """Wait until ``ip netns exec`` has moved ``proc`` into ``ns``, so
        :meth:`pids` and :meth:`kill_all` see it as soon as popen returns.
        """
        want = os.stat(f'/run/netns/{ns}')
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and not _exited(proc):
            try:
                got = os.stat(f'/proc/{proc.pid}/ns/net')
            except OSError:
                return
            if (got.st_dev, got.st_ino) == (want.st_dev, want.st_ino):
                return
            time.sleep(0.001)

    def run(self, host: str, argv: list[str],
            **kwargs: Any) -> subprocess.CompletedProcess:
        """Like :meth:`popen` but wait, as ``subprocess.run``;
        ``check`` defaults to True."""
        kwargs.setdefault('check', True)
        return subprocess.run(self._argv(host, argv), **self._kwargs(kwargs))

    def pids(self, host: str) -> list[int]:
        """PIDs of all processes in ``host``'s namespace."""
        return self._ns_pids(self.ns(host))

    @staticmethod
    def _ns_pids(ns: str) -> list[int]:
        out = _run_ip('netns', 'pids', ns).stdout
        return sorted(int(p) for p in out.split())

    def kill_all(self, host: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to every process in ``host``'s namespace.

        With SIGKILL (the default: "the host dies") this repeats until
        the namespace is empty, so children forked meanwhile die too.
        The network stays up; add :meth:`link_down` for a silent death.
        """
        self._kill_ns(self.ns(host), sig)

    def _kill_ns(self, ns: str, sig: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            pids = self._ns_pids(ns)
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if sig != signal.SIGKILL:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f'processes {pids} in {ns} survive '
                                   f'SIGKILL')
            time.sleep(0.02)

    # -- network faults ---------------------------------------------------

    def _set_link(self, host: str, state: str) -> None:
        if host not in self._veths:
            raise ValueError(f'no host link {host!r} in this lab')
        _run_ip('-n', self.ns(host), 'link', 'set', 'eth0', state)
        _run_ip('-n', self.ns('core'), 'link', 'set', self._veths[host],
                state)

    def link_down(self, host: str) -> None:
        """Cut ``host`` off the lab network (both ends of its veth down).

        Its packets go nowhere and nobody reaches it: connects to it time
        out, its own connects fail at once (no route).  Processes and
        addresses stay.
        """
        self._set_link(host, 'down')

    def link_up(self, host: str) -> None:
        """Heal a :meth:`link_down` (address and route come back)."""
        self._set_link(host, 'up')

    def _filter(self, action: str, a: str, b: str) -> None:
        for here, there in ((a, b), (b, a)):
            for chain, match in (('INPUT', '-s'), ('OUTPUT', '-d')):
                self.run(here, ['iptables', '-w', action, chain, match,
                                self.ip(there), '-j', 'DROP'])

    def cut(self, a: str, b: str) -> None:
        """Cut ``a`` and ``b`` apart, and only them: every packet between
        the two is dropped, both ways, silently (as by a failed link
        between their switches); each still reaches everyone else.
        ``'core'`` is allowed (the broker's and Redis's home)."""
        self._filter('-I', a, b)

    def heal(self, a: str, b: str) -> None:
        """Undo one :meth:`cut` of ``a`` and ``b``."""
        self._filter('-D', a, b)


class RabbitMQ(fixtures.Fixture):
    """A private RabbitMQ broker: in the lab's core namespace, or (with
    ``lab=None``) in the root namespace on 127.0.0.1.

    ``url`` (``rabbit://USER:PASS@IP:PORT/``) works with oslo.messaging
    from any host namespace of the lab (or from loopback).  Start-up
    takes ~6-8 s here, so share one per test class when you can.
    ``ctl(*args)`` runs rabbitmqctl against it.
    """

    START_TIMEOUT = 90.0

    def __init__(self, lab: Optional[Lab] = None) -> None:
        super().__init__()
        self.lab = lab

    def _setUp(self) -> None:
        self._dir = self.useFixture(fixtures.TempDir()).path
        k = next(_counter)
        self.nodename = f'ftlab{os.getpid()}x{k}@localhost'
        self.user = 'ftlab'
        self.password = secrets.token_hex(8)
        if self.lab is not None:
            # The core namespace is ours alone: no clash with anybody.
            self.host = self.lab.core_ip
            bind = '0.0.0.0'
            self.port = self.lab._core_port(5672)
            dist_port = self.lab._core_port(25672)
            epmd_port = self.lab._core_port(4369)
        else:
            self.host = bind = '127.0.0.1'
            self.port, dist_port, epmd_port = _free_ports(3)
        self.url = (f'rabbit://{self.user}:{self.password}@'
                    f'{self.host}:{self.port}/')
        self._log = os.path.join(self._dir, 'server.out')
        self._node_log = os.path.join(self._dir, 'log',
                                      f'{self.nodename}.log')
        self._env = self._write_config(bind, dist_port, epmd_port)

        # Our own epmd on a private port, so no daemon is left behind.
        epmd_argv = [EPMD, '-port', str(epmd_port)]
        if self.lab is None:
            epmd_argv += ['-address', '127.0.0.1']
        epmd = self._spawn(epmd_argv, os.path.join(self._dir, 'epmd.out'))
        self.addCleanup(_stop_process, epmd, signal.SIGTERM, 5.0)
        wait_for(lambda: tcp_open(self.host if self.lab else '127.0.0.1',
                                  epmd_port, 0.2),
                 10, what='epmd')

        self._server = self._spawn([RABBITMQ_SERVER], self._log)
        self.addCleanup(_stop_process, self._server, signal.SIGTERM, 15.0)
        self._wait_ready()

    def _write_config(self, bind: str, dist_port: int,
                      epmd_port: int) -> dict[str, str]:
        d = self._dir
        os.makedirs(os.path.join(d, 'mnesia'))
        os.makedirs(os.path.join(d, 'log'))
        cookie = os.path.join(d, '.erlang.cookie')
        with open(os.open(cookie, os.O_WRONLY | os.O_CREAT, 0o400),
                  'w') as f:
            f.write(secrets.token_hex(16).upper())
        # Classic Erlang-term config: skips cuttlefish, boots faster.
        with open(os.path.join(d, 'rabbitmq.config'), 'w') as f:
            f.write(
                '[{rabbit, [\n'
                '   {loopback_users, []},\n'
                f'   {{default_user, <<"{self.user}">>}},\n'
                f'   {{default_pass, <<"{self.password}">>}},\n'
                '   {default_permissions, [<<".*">>, <<".*">>, <<".*">>]},\n'
                f'   {{tcp_listeners, [{{"{bind}", {self.port}}}]}}\n'
                ']}].\n')
        with open(os.path.join(d, 'enabled_plugins'), 'w') as f:
            f.write('[].\n')
        open(os.path.join(d, 'rabbitmq-env.conf'), 'w').close()
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(('RABBITMQ_', 'ERL_'))}
        env.update({
            'HOME': d,                       # .erlang.cookie, for the CLI
            'LC_ALL': 'C.UTF-8',
            'ERL_EPMD_PORT': str(epmd_port),
            'RABBITMQ_NODENAME': self.nodename,
            'RABBITMQ_NODE_IP_ADDRESS': bind,
            'RABBITMQ_NODE_PORT': str(self.port),
            'RABBITMQ_DIST_PORT': str(dist_port),
            'RABBITMQ_CONF_ENV_FILE': os.path.join(d, 'rabbitmq-env.conf'),
            'RABBITMQ_CONFIG_FILE': os.path.join(d, 'rabbitmq.config'),
            'RABBITMQ_ADVANCED_CONFIG_FILE': os.path.join(
                d, 'advanced.config'),
            'RABBITMQ_ENABLED_PLUGINS_FILE': os.path.join(
                d, 'enabled_plugins'),
            'RABBITMQ_MNESIA_BASE': os.path.join(d, 'mnesia'),
            'RABBITMQ_LOG_BASE': os.path.join(d, 'log'),
            'RABBITMQ_PID_FILE': os.path.join(d, 'rabbit.pid'),
            'RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS':
                '-start_epmd false '
                '-kernel inet_dist_use_interface {127,0,0,1}',
            'RABBITMQ_CTL_ERL_ARGS': '-start_epmd false',
        })
        return env

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen:
        with open(log, 'ab') as out:
            kwargs: dict[str, Any] = dict(
                env=self._env, cwd=self._dir, stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT)
            if self.lab is not None:
                return self.lab.popen('core', argv, **kwargs)
            return subprocess.Popen(argv, start_new_session=True, **kwargs)

    def _can_log_in(self) -> bool:
        import amqp

        conn = amqp.Connection(host=f'{self.host}:{self.port}',
                               userid=self.user, password=self.password,
                               connect_timeout=1)
        try:
            conn.connect()
        except Exception:
            return False
        with contextlib.suppress(Exception):
            conn.close()
        return True

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.START_TIMEOUT
        while True:
            if _exited(self._server):
                raise RuntimeError(
                    f'rabbitmq-server exited before it was ready\n'
                    f'{self.log_tail()}')
            if tcp_open(self.host, self.port, 0.5) and self._can_log_in():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f'RabbitMQ not ready after {self.START_TIMEOUT}s on '
                    f'{self.host}:{self.port}\n{self.log_tail()}')
            time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's stdout and node log."""
        return (_tail(self._log, lines) + '\n'
                + _tail(self._node_log, lines))

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl ARGS`` against this node; return stdout.

        E.g. ``rabbit.ctl('list_queues', 'name', 'consumers')``.  Each
        call starts an Erlang VM: ~0.6 s.
        """
        argv = [RABBITMQCTL, '-n', self.nodename, *args]
        kwargs: dict[str, Any] = dict(env=self._env, cwd=self._dir,
                                      capture_output=True, text=True,
                                      timeout=timeout, check=False)
        if self.lab is not None:
            result = self.lab.run('core', argv, **kwargs)
        else:
            result = subprocess.run(argv, **kwargs)
        if result.returncode:
            raise RuntimeError(f'rabbitmqctl {" ".join(args)} failed '
                               f'({result.returncode}): {result.stderr}'
                               f'{result.stdout}')
        return result.stdout


class Redis(fixtures.Fixture):
    """A private Redis (no persistence): in the lab's core namespace,
    or (with ``lab=None``) in the root namespace on 127.0.0.1.

    ``url`` is ``redis://IP:PORT``; e.g. ``redis.Redis.from_url(url)``
    or a tooz ``redis://`` backend URL. ``process`` is the server's
    Popen (SIGSTOP/SIGCONT it to take the backend away and back).
    """

    START_TIMEOUT = 30.0

    def __init__(self, lab: Optional[Lab] = None) -> None:
        super().__init__()
        self.lab = lab

    def _setUp(self) -> None:
        import redis

        tmp = self.useFixture(fixtures.TempDir()).path
        if self.lab is not None:
            self.host = self.lab.core_ip
            self.port = self.lab._core_port(6379)
            bind = [self.host, '127.0.0.1']
        else:
            self.host = '127.0.0.1'
            self.port = _free_ports(1)[0]
            bind = [self.host]
        self.url = f'redis://{self.host}:{self.port}'
        self._log = os.path.join(tmp, 'redis.log')
        argv = [REDIS_SERVER, '--port', str(self.port), '--bind', *bind,
                '--save', '', '--appendonly', 'no', '--daemonize', 'no',
                '--protected-mode', 'no', '--dir', tmp, '--logfile', '']
        with open(self._log, 'ab') as out:
            kwargs: dict[str, Any] = dict(
                cwd=tmp, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)
            if self.lab is not None:
                proc = self.lab.popen('core', argv, **kwargs)
            else:
                proc = subprocess.Popen(argv, start_new_session=True,
                                        **kwargs)
        self.addCleanup(_stop_process, proc, signal.SIGTERM, 5.0)
        #: the redis-server process (SIGSTOP it to lose the backend)
        self.process = proc

        client = redis.Redis(host=self.host, port=self.port,
                             socket_connect_timeout=0.5, socket_timeout=2)

        def answers() -> bool:
            if _exited(proc):
                raise RuntimeError(f'redis-server exited\n'
                                   f'{_tail(self._log)}')
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_for(answers, self.START_TIMEOUT, what='redis PING')
        except TimeoutError as e:
            raise RuntimeError(f'{e}\n{_tail(self._log)}') from None
        finally:
            client.close()


AGENT_CONF = """\
[DEFAULT]
transport_url = {rabbit}
rpc_response_timeout = 20
debug = {debug}

[agent]
host = {host}
state_path = {state}
my_ip = {ip}
peers = {peers}
disk_dirs = {workdir}

[fencing]
backend_url = {redis}
lease = {lease}

[ft]
epoch_ms = 200
"""


def start_agent(lab: Lab, host: str, workdir: str, rabbit: RabbitMQ,
                backend: Union[Redis, EtcdCluster], lease: int = 3,
                peers: Optional[Sequence[str]] = None,
                extra_conf: str = '') -> subprocess.Popen:
    """Write ``host``'s agent config under ``workdir`` and start a real
    ``mftvm-agent`` in its namespace (state in ``workdir/<host>``, log in
    ``workdir/<host>-agent.log``, guests' disks in ``workdir``), fencing
    on ``backend`` (its ``url``); its peers are ``peers``, by default
    every lab host. ``extra_conf`` (ini text, e.g. ``[metrics]`` or
    ``[oslo_messaging_notifications]`` sections) is appended to the
    config."""
    import sys

    state = os.path.join(workdir, host)
    os.makedirs(state, exist_ok=True)
    conf = os.path.join(workdir, f'{host}.conf')
    with open(conf, 'w') as f:
        f.write(AGENT_CONF.format(
            host=host, state=state, workdir=workdir, rabbit=rabbit.url,
            redis=backend.url,
            ip=lab.ip(host), peers=','.join(peers or lab.hosts), lease=lease,
            debug='true' if os.environ.get('MFTVM_DEBUG') else 'false'))
        f.write(extra_conf)
    agent = os.path.join(os.path.dirname(sys.executable), 'mftvm-agent')
    with open(os.path.join(workdir, f'{host}-agent.log'), 'ab') as log:
        return lab.popen(host, [agent, '--config-file', conf], stdout=log,
                         stderr=log)


class EtcdCluster(fixtures.Fixture):
    """A private etcd cluster of three (or any odd number of) members.

    In a lab, each member runs in the namespace of one lab host named in
    ``members`` (so ``lab.link_down('e1')`` partitions a member away and
    ``lab.kill_all('e1')`` kills it); with ``lab=None`` all members run
    in the root namespace on 127.0.0.1, on free ports.  Data lives in a
    temp dir; the backend quota is small and no snapshot is taken.

    ``url`` is the tooz/fence backend URL naming every member
    (``etcd3+http://IP1:PORT?endpoints=IP2:PORT,IP3:PORT``);
    ``client_urls`` maps member -> ``http://IP:PORT``; ``process(m)``
    is a member's Popen (SIGSTOP it to freeze that member).  Start-up
    (all members answering, one leader) takes well under a second here.

    Example::

        lab = self.useFixture(ftlab.Lab(hosts=('h1', 'e1', 'e2', 'e3')))
        etcd = self.useFixture(ftlab.EtcdCluster(lab, ('e1', 'e2', 'e3')))
        fence = fencing.load_fence(etcd.url, 'vm0', member='h1', lease=3,
                                   state_dir='/unused')
    """

    START_TIMEOUT = 30.0
    CLIENT_PORT = 2379
    PEER_PORT = 2380

    def __init__(self, lab: Optional[Lab] = None,
                 members: Sequence[str] = ('e1', 'e2', 'e3')) -> None:
        super().__init__()
        self.lab = lab
        self.members: tuple[str, ...] = tuple(members)
        if len(self.members) % 2 != 1 or len(set(self.members)) != len(
                self.members):
            raise ValueError(f'an odd number of distinct members, not '
                             f'{self.members}')

    def _setUp(self) -> None:
        self._dir = self.useFixture(fixtures.TempDir()).path
        #: members' data and logs (removed at cleanup)
        self.data_dir = self._dir
        self._procs: dict[str, subprocess.Popen] = {}
        peer_urls: dict[str, str] = {}
        self.client_urls: dict[str, str] = {}
        if self.lab is not None:
            for m in self.members:
                ip = self.lab.ip(m)
                self.client_urls[m] = f'http://{ip}:{self.CLIENT_PORT}'
                peer_urls[m] = f'http://{ip}:{self.PEER_PORT}'
        else:
            ports = iter(_free_ports(2 * len(self.members)))
            for m in self.members:
                self.client_urls[m] = f'http://127.0.0.1:{next(ports)}'
                peer_urls[m] = f'http://127.0.0.1:{next(ports)}'
        cluster = ','.join(f'{m}={u}' for m, u in peer_urls.items())
        token = f'ftlab{os.getpid()}x{next(_counter)}'
        for m in self.members:
            self._start_member(m, cluster, token, self.client_urls[m],
                               peer_urls[m])
        endpoints = [u.split('://', 1)[1] for u in self.client_urls.values()]
        self.url = (f'etcd3+http://{endpoints[0]}'
                    f'?endpoints={",".join(endpoints[1:])}')
        self._wait_healthy()

    def _start_member(self, m: str, cluster: str, token: str,
                      client_url: str, peer_url: str) -> None:
        log = os.path.join(self._dir, f'{m}.log')
        argv = [ETCD, '--name', m,
                '--data-dir', os.path.join(self._dir, m),
                '--listen-client-urls', client_url,
                '--advertise-client-urls', client_url,
                '--listen-peer-urls', peer_url,
                '--initial-advertise-peer-urls', peer_url,
                '--initial-cluster', cluster,
                '--initial-cluster-token', token,
                '--initial-cluster-state', 'new',
                # Small: a fence needs a few keys, not gigabytes.
                '--quota-backend-bytes', str(16 * 1024 * 1024),
                '--snapshot-count', '10000',
                '--logger', 'zap', '--log-level', 'warn']
        with open(log, 'ab') as out:
            kwargs: dict[str, Any] = dict(
                cwd=self._dir, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT)
            if self.lab is not None:
                proc = self.lab.popen(m, argv, **kwargs)
            else:
                proc = subprocess.Popen(argv, start_new_session=True,
                                        **kwargs)
        # SIGCONT first: a member a test froze must be able to die.
        self.addCleanup(_stop_process, proc, signal.SIGTERM, 5.0)
        self.addCleanup(self._resume, proc)
        self._procs[m] = proc

    @staticmethod
    def _resume(proc: subprocess.Popen) -> None:
        if not _exited(proc):
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)

    def process(self, member: str) -> subprocess.Popen:
        """The etcd process of ``member``."""
        return self._procs[member]

    def status(self, member: str, timeout: float = 1.0) -> dict[str, Any]:
        """``member``'s /v3/maintenance/status (raises if it does not
        answer within ``timeout``)."""
        import requests

        resp = requests.post(
            f'{self.client_urls[member]}/v3/maintenance/status', json={},
            timeout=timeout)
        resp.raise_for_status()
        return resp.json()

    def leader(self) -> Optional[str]:
        """The member that leads, as every answering member sees it."""
        ids: dict[str, str] = {}
        leaders = set()
        for m in self.members:
            try:
                st = self.status(m, 0.5)
            except Exception:
                continue
            ids[st['header']['member_id']] = m
            leaders.add(st.get('leader'))
        if len(leaders) == 1:
            return ids.get(leaders.pop())
        return None

    def _wait_healthy(self) -> None:
        def healthy() -> bool:
            for m, proc in self._procs.items():
                if _exited(proc):
                    raise RuntimeError(f'etcd member {m} exited\n'
                                       f'{self.log_tail(m)}')
            answering = 0
            for m in self.members:
                try:
                    self.status(m, 0.5)
                    answering += 1
                except Exception:
                    return False
            return answering == len(self.members) and \
                self.leader() is not None

        try:
            wait_for(healthy, self.START_TIMEOUT, what='etcd cluster health')
        except TimeoutError as e:
            raise RuntimeError(
                f'{e}\n' + '\n'.join(self.log_tail(m)
                                     for m in self.members)) from None

    def log_tail(self, member: str, lines: int = 30) -> str:
        """The last lines of ``member``'s log."""
        return _tail(os.path.join(self._dir, f'{member}.log'), lines)
