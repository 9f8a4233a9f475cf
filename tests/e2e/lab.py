"""The end-to-end tier's one cloud lab, shared by every e2e test module.

The tier runs in one worker process (``stestr --concurrency 1``, and
``group_regex`` in ``.stestr.conf``); the first test that asks for the
lab brings it up (mftvm-openstack into ``.cloud-venv`` from a wheel
built here, then ``cloudlab.py up``: 2-4 minutes), and it is torn down
once, when that process exits. A new module only subclasses
:class:`LabTestCase`::

    from tests.e2e import lab

    class VolumeTest(lab.LabTestCase):
        def test_a_volume(self):
            self.add_hosts(*lab.HOSTS)              # once per lab
            flavor = self.unique('m1')
            self.flavor(flavor, 'ft:enabled=true',
                        'trait:CUSTOM_MFTVM_FT=required')
            server = self.server(self.unique('vm'), '--flavor', flavor,
                                 '--image', self.guest_image()['id'],
                                 '--nic', 'none', '--property', 'ft=true')
            self.wait_ft_status(server['id'], 'protected')  # Nova's
            self.wait_ft_protection(server['id'], 'protected')  # FT API

Rules that keep modules independent of each other and of their order:
every test makes its own resources under a :meth:`~LabTestCase.unique`
name and deletes them (``addCleanup``), or puts back what it changes
(the editable install, a restarted service); hosts, the FT API and the
guest image files are made once per lab and shared as they are.

Teardown: :func:`atexit` runs ``cloudlab.py down`` (also after a failed
test, ``KeyboardInterrupt`` or ``SIGTERM``, which is turned into
``SystemExit`` here). A process killed outright leaves its lab, named
``mfc-p<pid>``, to the next ``cloudlab.py up``, which removes it.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import testtools

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
VENV_BIN = os.path.join(ROOT, '.cloud-venv', 'bin')
PYTHON = os.path.join(VENV_BIN, 'python')
PIP = [PYTHON, '-m', 'pip', '--disable-pip-version-check', '-q']
CLOUDLAB = os.path.join(ROOT, 'tools', 'cloud', 'cloudlab.py')
#: flavor extra specs are checked by the API from this microversion on
VALIDATED = '2.86'
CLI_TIMEOUT = 300
#: the compute hosts, each with nova-compute (FTLibvirtDriver), its own
#: libvirtd, OVS and ovn-controller, and mftvm-agent
HOSTS = ('h1', 'h2', 'h3')
#: each agent's Prometheus endpoint (cloudlab.py add-host: deploy's
#: --metrics-port) on the host's management address
METRICS_PORT = 9787
#: where the agents send their versioned notifications, on cell1's vhost
NOTIFICATION_TOPIC = 'versioned_notifications'
#: Placement's microversion for reading allocations with their consumer
PLACEMENT_VERSION = 'placement 1.28'


def run(argv: list[str], timeout: float = CLI_TIMEOUT,
        **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def checked(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess:
    result = run(argv, **kwargs)
    if result.returncode:
        raise AssertionError(f'{" ".join(argv)} exited {result.returncode}'
                             f':\n{result.stdout}\n{result.stderr}')
    return result


def sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


class Lab:
    """The process's lab: :meth:`get` brings it up once; see the module
    docstring."""

    _instance: Optional[Lab] = None
    #: why the one try to bring it up failed (later tests fail at once)
    _failed: Optional[BaseException] = None
    _lock = threading.Lock()
    #: ``cloudlab.py up``'s options (Ceph and Cinder: test_volumes' RBD
    #: volumes; a benchmark without volumes leaves them out)
    up_options: tuple[str, ...] = ('--with-cinder',)

    def __init__(self) -> None:
        # Short: an instance's control socket lies under the lab's
        # directory (hosts/h1/mftvm/instances/<uuid>/secondary/
        # control.sock), and AF_UNIX paths end at 107 bytes.
        self.tmp = tempfile.mkdtemp(prefix='e2e-', dir='/tmp')
        self.dir = os.path.join(self.tmp, 'l')
        self.name = f'p{os.getpid()}'
        self.wheel = ''
        self.env: dict[str, str] = {}
        self.hosts: list[str] = []
        self._ft_api: Optional[str] = None
        self._guest_files: Optional[dict[str, str]] = None
        self._horizon: Optional[str] = None

    @classmethod
    def get(cls) -> Lab:
        with cls._lock:
            if cls._instance is not None:
                return cls._instance
            if cls._failed is not None:
                raise RuntimeError(f'the lab did not come up: '
                                   f'{cls._failed}') from cls._failed
            if os.geteuid() != 0:
                raise RuntimeError('the e2e tier needs root (network '
                                   'namespaces)')
            if not os.path.exists(PYTHON):
                raise RuntimeError(f'no {PYTHON}: run tools/run.sh test, '
                                   f'which makes .cloud-venv')
            lab = cls()
            # Registered before anything starts: whatever part of the lab
            # exists goes at exit.
            atexit.register(lab.tear_down)
            _exit_on_sigterm()
            try:
                lab._up()
            except BaseException as exc:
                cls._failed = exc
                lab.tear_down()
                raise
            cls._instance = lab
            return lab

    def _up(self) -> None:
        self.wheel = self._install_wheel()
        t0 = time.monotonic()
        with open(os.path.join(self.tmp, 'up.log'), 'w') as out:
            result = subprocess.run(
                [PYTHON, CLOUDLAB, 'up', '--dir', self.dir, '--name',
                 self.name, *self.up_options], stdout=out,
                stderr=subprocess.STDOUT, timeout=1200)
        if result.returncode:
            with open(os.path.join(self.tmp, 'up.log')) as f:
                raise RuntimeError(f'cloudlab up failed:\n'
                                   f'{f.read()[-6000:]}')
        self.up_seconds = time.monotonic() - t0
        self.env = self._openrc()

    def tear_down(self) -> None:
        """``cloudlab.py down`` (it ends every process in the lab's
        namespaces), then the lab's files; twice is harmless. With
        ``MFTVM_E2E_KEEP_LAB=1`` the lab stays up, to be looked at
        (:mod:`tests.e2e.diagnostics`), and how to end it is printed."""
        from tests.e2e import diagnostics
        if diagnostics.keep_lab():
            print(f'{diagnostics.KEEP_LAB}: the lab stays up; end it with '
                  f'{PYTHON} {CLOUDLAB} down --dir {self.dir}',
                  file=sys.stderr)
            return
        if os.path.exists(os.path.join(self.dir, 'lab.json')):
            run([PYTHON, CLOUDLAB, 'down', '--dir', self.dir], timeout=600)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _install_wheel(self) -> str:
        """mftvm-openstack into .cloud-venv, from a wheel built here."""
        out = os.path.join(self.tmp, 'wheel')
        checked([*PIP, 'wheel', '--no-deps', '--no-build-isolation',
                 '-w', out, ROOT], cwd=self.tmp)
        (wheel,) = [os.path.join(out, name) for name in os.listdir(out)]
        checked([*PIP, 'install', '--no-deps', '--force-reinstall', wheel])
        return wheel

    def _openrc(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith('OS_')}
        env['PATH'] = f'{VENV_BIN}:{env.get("PATH", os.defpath)}'
        with open(os.path.join(self.dir, 'openrc')) as f:
            for line in f:
                key, _, value = line.removeprefix('export ').strip(
                    ).partition('=')
                if key.startswith(('OS_', 'MFTVM_')):
                    env[key] = value
        return env

    def state(self) -> dict[str, Any]:
        """``lab.json``: the subnet, the hosts and their addresses."""
        with open(os.path.join(self.dir, 'lab.json')) as f:
            state: dict[str, Any] = json.load(f)
        return state

    @property
    def ip(self) -> str:
        """The control plane's address."""
        return f'10.78.{self.state()["subnet"]}.1'

    def cloudlab(self, *args: str, timeout: float = 900
                 ) -> subprocess.CompletedProcess:
        return checked([PYTHON, CLOUDLAB, *args, '--dir', self.dir],
                       timeout=timeout)

    def add_hosts(self, *names: str, network_only: bool = False) -> None:
        """Compute hosts (``cloudlab.py add-host``), each made once for
        the lab: tests that need them share them."""
        for host in names:
            if host not in self.hosts:
                self.cloudlab('add-host', host,
                              *(['--network-only'] if network_only else []))
                self.hosts.append(host)

    def ns(self, host: str) -> str:
        """The network namespace of compute host ``host``."""
        return f'mfc-{self.name}-{host}'

    def host_ip(self, host: str) -> str:
        """``host``'s management address (its agent's, nova-compute's)."""
        ip: str = self.state()['hosts'][host]['ip']
        return ip

    def ft_api(self) -> str:
        """The FT API's URL: ``mftvm-api`` started and its catalog entry
        registered, as doc/api.rst tells an operator, once for the lab."""
        if self._ft_api is None:
            url = self.cloudlab('ft-api', timeout=600).stdout.strip(
                ).splitlines()[-1]
            admin = [os.path.join(VENV_BIN, 'openstack')]
            checked([*admin, 'service', 'create', '--name', 'mftvm',
                     '--description', 'Fault-tolerant servers',
                     'fault-tolerance'], env=self.env, cwd=self.tmp)
            for interface in ('public', 'internal', 'admin'):
                checked([*admin, 'endpoint', 'create', '--region',
                         'RegionOne', 'fault-tolerance', interface, url],
                        env=self.env, cwd=self.tmp)
            self._ft_api = url
        return self._ft_api

    def guest_files(self) -> dict[str, str]:
        """The project's guest (``images.builder``), built once for the
        lab: ``{'kernel': path, 'initrd': path}``."""
        if self._guest_files is None:
            build = checked([PYTHON, '-m', 'mftvm_openstack.images.builder',
                             os.path.join(self.tmp, 'images')],
                            cwd=self.tmp)
            self._guest_files = dict(
                line.split(' ', 1) for line in build.stdout.splitlines())
        return self._guest_files

    def horizon(self) -> str:
        """Horizon's URL (``cloudlab.py horizon``), started once for the
        lab by the first test that asks."""
        if self._horizon is None:
            self._horizon = self.cloudlab('horizon').stdout.strip(
                ).splitlines()[-1]
        return self._horizon


def _exit_on_sigterm() -> None:
    """SIGTERM (a runner's timeout) as SystemExit, so that atexit tears
    the lab down; a handler someone else set is left alone."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM,
                      lambda signum, frame: sys.exit(128 + signum))


class Notifications:
    """A real consumer of the agents' versioned notifications: an
    oslo.messaging notification listener on the lab's RabbitMQ (cell1's
    vhost, the agents' transport), in a pool of its own so that it takes
    nothing from other consumers::

        with self.notifications() as seen:
            ...                                  # something happens
            notice = seen.wait_for('mftvm.instance.protect.error')
            notice['publisher_id']               # 'mftvm-agent:h1'
    """

    def __init__(self, transport_url: str,
                 topic: str = NOTIFICATION_TOPIC) -> None:
        import oslo_messaging
        from oslo_config import cfg

        self._cond = threading.Condition()
        self.seen: list[dict[str, Any]] = []
        conf = cfg.ConfigOpts()
        conf([], project='mftvm-e2e', default_config_files=[])
        self._transport = oslo_messaging.get_notification_transport(
            conf, url=transport_url)
        self._listener = oslo_messaging.get_notification_listener(
            self._transport, [oslo_messaging.Target(topic=topic)], [self],
            executor='threading', pool=f'e2e-{uuid.uuid4().hex[:8]}')

    def _seen(self, priority: str, publisher_id: str, event_type: str,
              payload: Any) -> None:
        with self._cond:
            self.seen.append({'priority': priority,
                              'publisher_id': publisher_id,
                              'event_type': event_type, 'payload': payload,
                              'at': time.time()})
            self._cond.notify_all()

    # the listener's endpoint: one method per priority
    def info(self, ctxt: Any, publisher_id: str, event_type: str,
             payload: Any, metadata: Any) -> None:
        self._seen('info', publisher_id, event_type, payload)

    def error(self, ctxt: Any, publisher_id: str, event_type: str,
              payload: Any, metadata: Any) -> None:
        self._seen('error', publisher_id, event_type, payload)

    def start(self) -> None:
        self._listener.start()

    def stop(self) -> None:
        self._listener.stop()
        self._listener.wait()
        self._transport.cleanup()

    def wait_for(self, event_type: str, timeout: float = 120,
                 since: float = 0.0, **payload_data: Any
                 ) -> dict[str, Any]:
        """The first notice of ``event_type`` whose payload's data has
        ``payload_data``, received at ``since`` (``time.time()``) or
        later; AssertionError after ``timeout`` seconds."""
        def match() -> Optional[dict[str, Any]]:
            for notice in self.seen:
                if notice['at'] < since:
                    continue
                data = notice['payload'].get('mftvm_object.data', {}) \
                    if isinstance(notice['payload'], dict) else {}
                if notice['event_type'] == event_type and all(
                        data.get(k) == v for k, v in payload_data.items()):
                    return notice
            return None

        with self._cond:
            if not self._cond.wait_for(match, timeout):
                seen = [(n['publisher_id'], n['event_type'])
                        for n in self.seen]
                raise AssertionError(f'no {event_type} {payload_data} in '
                                     f'{timeout} s; seen: {seen}')
            found = match()
            assert found is not None
            return found


class LabTestCase(testtools.TestCase):
    """A test against the shared lab, through the ``openstack`` CLI.

    ``self.lab`` is the :class:`Lab`; ``self.env`` the admin's openrc;
    ``self.tmp`` a directory the lab's life long.
    """

    lab: Lab
    env: dict[str, str]
    tmp: str
    lab_dir: str

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.lab = Lab.get()
        cls.env = cls.lab.env
        cls.tmp = cls.lab.tmp
        cls.lab_dir = cls.lab.dir

    # -- names, hosts ------------------------------------------------------

    @staticmethod
    def unique(prefix: str) -> str:
        """A name no other test uses: ``prefix-<8 hex>``."""
        return f'{prefix}-{uuid.uuid4().hex[:8]}'

    def add_hosts(self, *names: str) -> None:
        """Compute hosts, made once for the lab (:meth:`Lab.add_hosts`)."""
        self.lab.add_hosts(*names)

    def ns(self, host: str) -> str:
        return self.lab.ns(host)

    def only_hosts(self, *names: str) -> None:
        """For this test, servers (and FT secondaries) go to ``names``
        only: every other compute host's nova-compute is disabled, and
        enabled again after the test (hosts other modules added, or a
        host another test powered off, stay out of the way)."""
        for service in self.openstack_json('compute', 'service', 'list',
                                           '--service', 'nova-compute'):
            if service['Host'] in names or service['Status'] != 'enabled':
                continue
            self.openstack('compute', 'service', 'set', '--disable',
                           '--disable-reason', f'e2e: {self.id()}',
                           service['Host'], 'nova-compute')
            self.addCleanup(self.openstack, 'compute', 'service', 'set',
                            '--enable', service['Host'], 'nova-compute',
                            check=False)

    # -- the CLIs ----------------------------------------------------------

    def openstack(self, *args: str, check: bool = True,
                  microversion: Optional[str] = None,
                  env: Optional[dict[str, str]] = None
                  ) -> subprocess.CompletedProcess:
        """``openstack ARGS`` as the lab's admin (or with ``env``)."""
        argv = [os.path.join(VENV_BIN, 'openstack')]
        if microversion:
            argv += ['--os-compute-api-version', microversion]
        argv += list(args)
        result = run(argv, env=env or self.env, cwd=self.tmp)
        if check and result.returncode:
            self.fail(f'openstack {" ".join(args)} exited '
                      f'{result.returncode}:\n{result.stderr[-3000:]}')
        return result

    def openstack_json(self, *args: str, **kwargs: Any) -> Any:
        return json.loads(self.openstack(*args, '-f', 'json',
                                         **kwargs).stdout)

    # the names test_cloud.py has always used
    cloud = openstack
    cloud_json = openstack_json

    def mftvm(self, *args: str, check: bool = True
              ) -> subprocess.CompletedProcess:
        """``mftvm ARGS`` as an operator runs it (the broker from the
        lab's openrc, ``MFTVM_TRANSPORT_URL``)."""
        result = run([os.path.join(VENV_BIN, 'mftvm'), *args],
                     env=self.env, cwd=self.tmp)
        if check and result.returncode:
            self.fail(f'mftvm {" ".join(args)} exited {result.returncode}'
                      f':\n{result.stderr[-3000:]}')
        return result

    # -- flavors, images, servers ----------------------------------------

    def flavor(self, name: str, *properties: str, ram: int = 128) -> dict:
        """A flavor with ``properties`` (checked at :data:`VALIDATED`),
        deleted after the test; returns the properties it has."""
        args = ['flavor', 'create', '--ram', str(ram), '--disk', '1',
                '--vcpus', '1']
        for prop in properties:
            args += ['--property', prop]
        self.openstack(*args, name, microversion=VALIDATED)
        self.addCleanup(self.openstack, 'flavor', 'delete', name,
                        check=False)
        return self.openstack_json(  # type: ignore[no-any-return]
            'flavor', 'show', name)['properties']

    def upload_guest(self, name: str, *properties: str
                     ) -> tuple[dict, dict, dict, dict[str, str]]:
        """The project's guest as kernel, ramdisk and a 64 MiB raw disk
        that names both, deleted after the test: (kernel, ramdisk, disk)
        images and the built files."""
        parts = self.lab.guest_files()
        disk = os.path.join(self.tmp, 'images', 'disk.raw')
        if not os.path.exists(disk):
            with open(disk, 'wb') as f:
                f.truncate(64 << 20)
        kernel = self.openstack_json(
            'image', 'create', '--disk-format', 'aki', '--container-format',
            'aki', '--file', parts['kernel'], f'{name}-kernel')
        self.addCleanup(self.openstack, 'image', 'delete', kernel['id'],
                        check=False)
        ramdisk = self.openstack_json(
            'image', 'create', '--disk-format', 'ari', '--container-format',
            'ari', '--file', parts['initrd'], f'{name}-ramdisk')
        self.addCleanup(self.openstack, 'image', 'delete', ramdisk['id'],
                        check=False)
        args = ['image', 'create', '--disk-format', 'raw',
                '--container-format', 'bare', '--file', disk,
                '--property', f'kernel_id={kernel["id"]}',
                '--property', f'ramdisk_id={ramdisk["id"]}']
        for prop in properties:
            args += ['--property', prop]
        guest = self.openstack_json(*args, name)
        self.addCleanup(self.openstack, 'image', 'delete', guest['id'],
                        check=False)
        return kernel, ramdisk, guest, parts

    def server(self, name: str, *args: str, wait: bool = True,
               microversion: Optional[str] = None) -> dict:
        """``openstack server create ARGS NAME`` (``--wait`` unless
        ``wait`` is false), deleted (waited for) after the test."""
        created = self.openstack_json(
            'server', 'create', *args, *(['--wait'] if wait else []), name,
            microversion=microversion)
        self.addCleanup(self.openstack, 'server', 'delete', '--wait',
                        created['id'], check=False)
        return created  # type: ignore[no-any-return]

    def probe(self, host: str, port_id: str) -> str:
        """Neutron port ``port_id`` plugged into ``host`` as the host's
        own interface (``cloudlab.py probe``), unplugged after the test
        (its address would clash with the next test's network); returns
        the interface's name."""
        dev = self.lab.cloudlab('probe', host, port_id).stdout.strip(
            ).splitlines()[-1]
        enter = self.lab.state()['hosts'][host]['enter']
        self.addCleanup(run, [*enter, 'ovs-vsctl', '--timeout=30',
                              '--if-exists', 'del-port', 'br-int', dev])
        return dev

    def guest_port(self, name: str) -> dict:
        """A port on a network and subnet of its own (10.0.2.0/24), all
        deleted after the test: an FT server needs a NIC (the engine
        holds a NIC's output; a guest with none is refused protection).
        """
        network = self.openstack_json('network', 'create', f'{name}-net')
        self.addCleanup(self.openstack, 'network', 'delete', network['id'],
                        check=False)
        self.openstack('subnet', 'create', '--network', network['id'],
                       '--subnet-range', '10.0.2.0/24', f'{name}-subnet')
        port = self.openstack_json('port', 'create', '--network',
                                   network['id'], f'{name}-guest')
        self.addCleanup(self.openstack, 'port', 'delete', port['id'],
                        check=False)
        return port  # type: ignore[no-any-return]

    # -- FT: the API, notifications, metrics -----------------------------

    def ft_show(self, server: str) -> dict:
        """``openstack ft server show SERVER`` as the admin (the FT API,
        started for the lab on first use)."""
        self.lab.ft_api()
        return self.openstack_json(  # type: ignore[no-any-return]
            'ft', 'server', 'show', server)

    def wait_ft_status(self, server_id: str, want: str = 'protected',
                       timeout: float = 600, host: Optional[str] = None
                       ) -> dict:
        """``server show`` once Nova's ``ft_status`` is ``want`` (and
        the server's host ``host``, if given); fails with what it last
        showed otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            shown = self.openstack_json('server', 'show', server_id)
            status = shown['properties'].get('ft_status')
            if status == want and host in (
                    None, shown['OS-EXT-SRV-ATTR:host']):
                return shown  # type: ignore[no-any-return]
            if time.monotonic() > deadline:
                self.fail(f'ft_status {status!r}, not {want!r} within '
                          f'{timeout}s: {json.dumps(shown)[:3000]}')
            time.sleep(3)

    def wait_ft_protection(self, server: str, protection: str,
                           timeout: float = 300) -> tuple[dict, float]:
        """Poll ``openstack ft server show`` until the server's
        ``protection`` is ``protection``: (what it showed, seconds it
        took). Fails with the last answer after ``timeout``."""
        t0 = time.monotonic()
        shown: dict = {}
        while time.monotonic() - t0 < timeout:
            shown = self.ft_show(server)
            if shown.get('protection') == protection:
                return shown, time.monotonic() - t0
            time.sleep(0.5)
        self.fail(f'{server}: not {protection} after {timeout} s: {shown}')

    @contextmanager
    def notifications(self) -> Iterator[Notifications]:
        """The agents' notifications from now on (:class:`Notifications`).
        """
        listener = Notifications(self.env['MFTVM_TRANSPORT_URL'])
        listener.start()
        try:
            yield listener
        finally:
            listener.stop()

    # -- Placement --------------------------------------------------------

    @functools.cached_property
    def placement(self) -> str:
        """Placement's URL, from the catalog."""
        url: str = self.openstack_json(
            'endpoint', 'list', '--service', 'placement', '--interface',
            'public')[0]['URL']
        return url.rstrip('/')

    def held_by(self, consumer: str, token: str) -> set[str]:
        """The hosts whose resource providers hold allocations of
        Placement consumer ``consumer``."""
        import urllib.request

        def get(path: str) -> Any:
            req = urllib.request.Request(f'{self.placement}{path}', headers={
                'X-Auth-Token': token,
                'OpenStack-API-Version': PLACEMENT_VERSION})
            with urllib.request.urlopen(req, timeout=30) as resp:
                return json.loads(resp.read())

        return {get(f'/resource_providers/{rp}')['name']
                for rp in get(f'/allocations/{consumer}')['allocations']}

    def secondary_consumer(self, server_id: str) -> str:
        """The Placement consumer of the server's secondary, as the
        driver names it (asked of the package installed in the lab)."""
        return checked([
            PYTHON, '-c', 'import sys; from mftvm_openstack.nova.'
            'driver import secondary_consumer as c; print(c(sys.argv[1]))',
            server_id], cwd=self.tmp).stdout.strip()

    def metrics(self, host: str) -> str:
        """``host``'s agent's Prometheus endpoint, as a scraper reads it
        from the control plane's network."""
        import urllib.request

        url = f'http://{self.lab.host_ip(host)}:{METRICS_PORT}/metrics'
        with urllib.request.urlopen(url, timeout=30) as resp:
            text: str = resp.read().decode()
        return text
