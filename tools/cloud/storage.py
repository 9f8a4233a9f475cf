"""Block storage for the cloud lab: a single-node Ceph and Cinder on it.

``cloudlab.py up --with-cinder`` calls :func:`up` once the control plane
answers; ``add-host`` then calls :func:`configure_host` for each compute
host.  What it makes, all in the lab's control namespace::

    ceph-mon a   [v2:10.78.N.1:3300,v1:10.78.N.1:6789]
    ceph-mgr x   (Cinder's RBD driver asks it for the pool's usage)
    ceph-osd 0   BlueStore on a sparse file, lab/ceph/osd/ceph-0/block
    pool volumes (size 1), cephx user client.cinder (profile rbd on it)
    cinder-api :8776, cinder-scheduler, cinder-volume (backend "ceph",
    the RBD driver), registered in Keystone as volumev3 and block-storage

and per compute host: ``/etc/ceph`` (bound to the host's own directory:
``ceph.conf`` and client.cinder's keyring), a libvirt secret holding
that key, and nova-compute's ``[libvirt] rbd_user``/``rbd_secret_uuid``
in a second config file::

    openstack volume create --size 1 v1
    openstack server add volume vm1 v1     # QEMU opens rbd:volumes/...

Everything is small (doc/cloud-lab.rst, "Volumes"): one OSD with tight
RocksDB buffers and a 64 MB cache, run with ``MALLOC_ARENA_MAX=2``; the
PG autoscaler off (it stalled I/O mid-test when probed); size-1 pools.
The recipe was probed by hand first (LAB-NOTES.md).

No kernel attach is possible on this kernel (no rbd or nbd module), and
none is needed: QEMU's rbd block driver talks to Ceph itself, and
Cinder's RBD driver imports images with the ``rbd`` CLI.
"""

from __future__ import annotations

import glob
import json
import os
import secrets
import sysconfig
import time
import uuid
from typing import Any

import cloudlab
from cloudlab import Lab, LabError, log, run, start, wait_for

CEPH = '/usr/bin/ceph'
CEPH_AUTHTOOL = '/usr/bin/ceph-authtool'
MONMAPTOOL = '/usr/bin/monmaptool'
CEPH_MON = '/usr/bin/ceph-mon'
CEPH_MGR = '/usr/bin/ceph-mgr'
CEPH_OSD = '/usr/bin/ceph-osd'
RBD = '/usr/bin/rbd'
#: Debian's librados/librbd bindings (python3-rados, python3-rbd); PyPI
#: has none.  Cinder's RBD driver imports them.
DEBIAN_BINDINGS = '/usr/lib/python3/dist-packages'
CINDER_PORT = 8776
POOL = 'volumes'
CEPH_USER = 'cinder'
BACKEND = 'ceph'
#: the OSD's sparse block file (BlueStore), bytes at most
OSD_SIZE = '10G'


def ceph_dir(lab: Lab, *parts: str) -> str:
    return lab.path('ceph', *parts)


def cinder_url(lab: Lab) -> str:
    return f'http://{lab.ip}:{CINDER_PORT}'


def ceph(lab: Lab, *args: str, user: str = 'admin',
         stdin: str | None = None) -> str:
    """The ``ceph`` CLI as ``client.<user>`` (in the namespace, where the
    monitor listens)."""
    return run([CEPH, '-c', ceph_dir(lab, 'ceph.conf'), '--id', user,
                '--connect-timeout', '30', *args], lab.ns,
               input=stdin).stdout


# -- configuration ------------------------------------------------------


def ceph_conf(lab: Lab, fsid: str, keyring: str,
              daemons: bool) -> dict[str, dict[str, Any]]:
    """ceph.conf: every path in the lab; ``daemons`` adds the sections
    the daemons read (a host's copy is a client's only)."""
    mon = f'[v2:{lab.ip}:3300,v1:{lab.ip}:6789]'
    conf: dict[str, dict[str, Any]] = {
        'global': {'fsid': fsid, 'mon_host': mon, 'ms_bind_ipv6': 'false',
                   'auth_cluster_required': 'cephx',
                   'auth_service_required': 'cephx',
                   'auth_client_required': 'cephx'},
        # clients only: each daemon finds its key in its data directory
        'client': {'keyring': keyring}}
    if not daemons:
        # a client's log and admin socket: none
        conf['global'].update({'log_file': '/dev/null', 'admin_socket': ''})
        return conf
    d = ceph_dir(lab)
    conf['global'].update({
        'public_network': f'{lab.ip.rsplit(".", 1)[0]}.0/24',
        'run_dir': os.path.join(d, 'run'),
        'admin_socket': os.path.join(d, 'run', '$cluster-$name.asok'),
        'log_file': lab.path('log', 'ceph-$name.log'),
        'mon_cluster_log_file': lab.path('log', 'ceph-cluster.log'),
        'log_max_recent': 1000,
        # one OSD: size-1 pools, no failure domain above the OSD
        'osd_pool_default_size': 1, 'osd_pool_default_min_size': 1,
        'mon_allow_pool_size_one': 'true',
        'mon_warn_on_pool_no_redundancy': 'false',
        'osd_crush_chooseleaf_type': 0,
        'osd_pool_default_pg_autoscale_mode': 'off',
        'mon_data_avail_warn': 2, 'mon_data_avail_crit': 1,
        'mon_allow_pool_delete': 'true',
        'auth_allow_insecure_global_id_reclaim': 'false',
    })
    conf['mon'] = {'mon_data': os.path.join(d, 'mon', '$cluster-$id')}
    conf['mgr'] = {'mgr_data': os.path.join(d, 'mgr', '$cluster-$id')}
    conf['osd'] = {
        'osd_data': os.path.join(d, 'osd', '$cluster-$id'),
        'osd_objectstore': 'bluestore',
        'bluestore_block_create': 'true',
        'bluestore_block_size': OSD_SIZE,
        # small: 1-1.4 GB RSS with the defaults, 45-500 MB with these
        'bluestore_cache_autotune': 'false',
        'bluestore_cache_size': '64M',
        'bluestore_rocksdb_options': (
            'compression=kNoCompression,max_write_buffer_number=2,'
            'min_write_buffer_number_to_merge=1,recycle_log_file_num=4,'
            'write_buffer_size=33554432,writable_file_max_buffer_size=0,'
            'compaction_readahead_size=2097152,max_background_compactions=1'),
        'osd_op_num_shards': 1, 'osd_op_num_threads_per_shard': 2,
    }
    return conf


def write_keyring(path: str, name: str, key: str) -> None:
    cloudlab.write_ini(path, {name: {'key': key}})


def gen_key() -> str:
    return run([CEPH_AUTHTOOL, '--gen-print-key']).stdout.strip()


# -- Ceph ---------------------------------------------------------------


def start_ceph(lab: Lab) -> dict[str, Any]:
    """Mon, mgr and one OSD, the pool and client.cinder; returns what
    the lab remembers (fsid, the libvirt secret's UUID)."""
    d = ceph_dir(lab)
    for sub in ('run', 'mon/ceph-a', 'mgr/ceph-x', 'osd/ceph-0'):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    os.chmod(d, 0o700)
    fsid = str(uuid.uuid4())
    conf = ceph_dir(lab, 'ceph.conf')
    cloudlab.write_ini(conf, ceph_conf(
        lab, fsid, os.path.join(d, '$cluster.$name.keyring'), True))
    mon_keyring = ceph_dir(lab, 'mon.keyring')
    admin_keyring = ceph_dir(lab, 'ceph.client.admin.keyring')
    run([CEPH_AUTHTOOL, '--create-keyring', mon_keyring, '--gen-key',
         '-n', 'mon.', '--cap', 'mon', 'allow *'])
    run([CEPH_AUTHTOOL, '--create-keyring', admin_keyring, '--gen-key',
         '-n', 'client.admin', '--cap', 'mon', 'allow *', '--cap', 'osd',
         'allow *', '--cap', 'mgr', 'allow *', '--cap', 'mds', 'allow *'])
    run([CEPH_AUTHTOOL, mon_keyring, '--import-keyring', admin_keyring])
    monmap = ceph_dir(lab, 'monmap')
    run([MONMAPTOOL, '--create', '--fsid', fsid, '--addv', 'a',
         f'[v2:{lab.ip}:3300,v1:{lab.ip}:6789]', monmap])
    run([CEPH_MON, '-c', conf, '--mkfs', '-i', 'a', '--monmap', monmap,
         '--keyring', mon_keyring], lab.ns)
    start(lab, 'ceph-mon', [CEPH_MON, '-c', conf, '-f', '-i', 'a'])
    wait_for('the Ceph monitor', lambda: run(
        [CEPH, '-c', conf, '--connect-timeout', '5', 'mon', 'stat'],
        lab.ns, check=False).returncode == 0, lab, 'ceph-mon', timeout=120)

    mgr_key = ceph(lab, 'auth', 'get-or-create', 'mgr.x', 'mon',
                   'allow profile mgr', 'osd', 'allow *', 'mds', 'allow *')
    with open(os.open(ceph_dir(lab, 'mgr', 'ceph-x', 'keyring'),
                      os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
              'w') as f:
        f.write(mgr_key)
    start(lab, 'ceph-mgr', [CEPH_MGR, '-c', conf, '-f', '-i', 'x'],
          MALLOC_ARENA_MAX='2')

    # The OSD: its key first, then "osd new" with it, then mkfs.
    osd_uuid = str(uuid.uuid4())
    osd_key = gen_key()
    osd_id = ceph(lab, 'osd', 'new', osd_uuid, '-i', '-',
                  stdin=json.dumps({'cephx_secret': osd_key})).strip()
    if osd_id != '0':
        raise LabError(f'ceph osd new gave id {osd_id!r}, not 0')
    write_keyring(ceph_dir(lab, 'osd', 'ceph-0', 'keyring'), 'osd.0',
                  osd_key)
    run([CEPH_OSD, '-c', conf, '-i', '0', '--mkfs', '--osd-uuid',
         osd_uuid], lab.ns, env=cloudlab.service_env(
             lab, MALLOC_ARENA_MAX='2'))
    start(lab, 'ceph-osd', [CEPH_OSD, '-c', conf, '-f', '-i', '0'],
          MALLOC_ARENA_MAX='2')

    def osd_up() -> bool:
        status = json.loads(ceph(lab, 'osd', 'stat', '-f', 'json'))
        return bool(status.get('num_up_osds') == 1)

    wait_for('the Ceph OSD to be up', osd_up, lab, 'ceph-osd', timeout=180)
    ceph(lab, 'osd', 'pool', 'create', POOL, '8', '8')
    run([RBD, '-c', conf, '--id', 'admin', 'pool', 'init', POOL], lab.ns)
    # Cinder's and the computes' user: RBD on the pool; "profile rbd"
    # on the monitor also lets it blocklist a dead client of its own
    # (the fence a failover needs; doc/volumes.rst).
    key = ceph(lab, 'auth', 'get-or-create', f'client.{CEPH_USER}', 'mon',
               'profile rbd', 'osd', f'profile rbd pool={POOL}', 'mgr',
               f'profile rbd pool={POOL}')
    with open(os.open(ceph_dir(lab, f'ceph.client.{CEPH_USER}.keyring'),
                      os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
              'w') as f:
        f.write(key)
    return {'fsid': fsid, 'secret_uuid': str(uuid.uuid4()),
            'key': user_key(lab)}


def user_key(lab: Lab) -> str:
    """client.cinder's secret (base64), from its keyring."""
    with open(ceph_dir(lab, f'ceph.client.{CEPH_USER}.keyring')) as f:
        for line in f:
            name, _, value = line.partition('=')
            if name.strip() == 'key':
                return value.strip()
    raise LabError(f'no key in client.{CEPH_USER}\'s keyring')


# -- Cinder -------------------------------------------------------------


def link_bindings() -> None:
    """Debian's ``rados`` and ``rbd`` modules into the venv we run from
    (symlinks; PyPI has none), for cinder-volume's RBD driver."""
    site = sysconfig.get_paths()['purelib']
    for name in ('rados', 'rbd'):
        found = glob.glob(os.path.join(DEBIAN_BINDINGS,
                                       f'{name}.cpython-311-*.so'))
        if not found:
            raise LabError(f'no {name} module in {DEBIAN_BINDINGS}: '
                           f'apt-get install python3-{name}')
        link = os.path.join(site, os.path.basename(found[0]))
        if os.path.realpath(link) != found[0]:
            if os.path.lexists(link):
                os.unlink(link)
            os.symlink(found[0], link)


def configure_cinder(lab: Lab, ceph_state: dict[str, Any]) -> str:
    """cinder.conf: the API, scheduler and volume service on the lab's
    broker and MariaDB; backend ``ceph`` with the RBD driver as
    client.cinder.  Root helpers run through the lab's ``sudo`` (we are
    root already; Debian's sudo would not find the venv's rootwrap)."""
    etc = lab.path('etc', 'cinder')
    os.makedirs(etc, exist_ok=True)
    for d in ('state', 'bin', 'conversion'):
        os.makedirs(lab.path('cinder', d), exist_ok=True)
    sudo = lab.path('cinder', 'bin', 'sudo')
    with open(sudo, 'w') as f:
        f.write('#!/bin/sh\n# the lab runs as root: sudo just runs\n'
                'exec "$@"\n')
    os.chmod(sudo, 0o755)
    venv_etc = os.path.join(cloudlab.VENV, 'etc', 'cinder')
    rootwrap = os.path.join(etc, 'rootwrap.conf')
    cloudlab.write_ini(rootwrap, {'DEFAULT': {
        'filters_path': os.path.join(venv_etc, 'rootwrap.d'),
        'exec_dirs': f'{cloudlab.BIN},/sbin,/usr/sbin,/bin,/usr/bin',
        'use_syslog': 'False'}})
    conf = os.path.join(etc, 'cinder.conf')
    cloudlab.write_ini(conf, {
        'DEFAULT': {**cloudlab.oslo_log(lab, 'cinder'),
                    'transport_url': lab.rabbit_url(),
                    'auth_strategy': 'keystone', 'my_ip': lab.ip,
                    'osapi_volume_listen': lab.ip,
                    'osapi_volume_listen_port': CINDER_PORT,
                    'osapi_volume_workers': 1,
                    'api_paste_config': os.path.join(venv_etc,
                                                     'api-paste.ini'),
                    'glance_api_servers': lab.url('glance'),
                    'state_path': lab.path('cinder', 'state'),
                    'image_conversion_dir': lab.path('cinder',
                                                     'conversion'),
                    'rootwrap_config': rootwrap,
                    'enabled_backends': BACKEND,
                    'default_volume_type': '__DEFAULT__'},
        'database': {'connection': lab.db_url('cinder')},
        'keystone_authtoken': {**cloudlab.authtoken(lab, 'cinder'),
                               'service_token_roles_required': True},
        'nova': cloudlab.service_auth(lab, 'cinder'),
        'oslo_concurrency': {'lock_path': lab.path('lock')},
        'oslo_messaging_notifications': {'driver': 'noop'},
        'coordination': {'backend_url':
                         f'file://{lab.path("cinder", "state")}'},
        BACKEND: {'volume_driver': 'cinder.volume.drivers.rbd.RBDDriver',
                  'volume_backend_name': BACKEND,
                  'rbd_pool': POOL,
                  'rbd_ceph_conf': ceph_dir(lab, 'ceph.conf'),
                  'rbd_user': CEPH_USER,
                  'rbd_secret_uuid': ceph_state['secret_uuid'],
                  'report_discard_supported': 'true'},
    })
    # one log file per daemon (see nova's log-*.conf)
    for name in ('cinder-api', 'cinder-scheduler', 'cinder-volume'):
        cloudlab.write_ini(os.path.join(etc, f'log-{name}.conf'),
                           {'DEFAULT': cloudlab.oslo_log(lab, name)})
    return conf


def create_database(lab: Lab) -> None:
    run([cloudlab.MARIADB, '--no-defaults',
         f'--socket={lab.path("mysql.sock")}', '-uroot', '-e',
         "CREATE DATABASE cinder; "
         "GRANT ALL ON cinder.* TO 'cloud'@'127.0.0.1';"])


def register_cinder(lab: Lab) -> None:
    """Cinder's service user and catalog entries, as DevStack makes
    them: ``volumev3`` (what Nova asks for) and ``block-storage``."""
    import openstack

    lab.state['passwords'].setdefault('cinder', secrets.token_hex(12))
    lab.save()
    conn = openstack.connect(
        auth_url=lab.url('keystone') + '/v3',
        username='admin', password=lab.password('admin'),
        project_name='admin', user_domain_name='Default',
        project_domain_name='Default', region_name='RegionOne')
    idn: Any = conn.identity
    project = idn.find_project('service', domain_id='default')
    user = idn.create_user(name='cinder', domain_id='default',
                           password=lab.password('cinder'),
                           default_project_id=project.id)
    for role in ('admin', 'service'):
        idn.assign_project_role_to_user(project, user, idn.find_role(role))
    url = cinder_url(lab) + '/v3/%(project_id)s'
    for name, kind in (('cinderv3', 'volumev3'),
                       ('cinder', 'block-storage')):
        service = idn.create_service(name=name, type=kind)
        for interface in ('public', 'internal', 'admin'):
            idn.create_endpoint(service_id=service.id, interface=interface,
                                url=url, region_id='RegionOne')


def start_cinder(lab: Lab, conf: str) -> None:
    bin_ = cloudlab.BIN
    etc = os.path.dirname(conf)
    cloudlab.manage(lab, 'cinder-manage', '--config-file', conf, 'db',
                    'sync')
    path = f'{lab.path("cinder", "bin")}:{bin_}:/usr/sbin:/usr/bin:/sbin:/bin'
    for name in ('cinder-api', 'cinder-scheduler', 'cinder-volume'):
        start(lab, name, [os.path.join(bin_, name), '--config-file', conf,
                          '--config-file',
                          os.path.join(etc, f'log-{name}.conf')],
              PATH=path)
    cloudlab.wait_http(lab, 'cinder-api', cinder_url(lab))

    def volume_service_up() -> bool:
        result = run([os.path.join(bin_, 'openstack'), 'volume', 'service',
                      'list', '-f', 'json'], check=False,
                     env=cloudlab.openrc_env(lab))
        if result.returncode:
            return False
        up_ = {(s['Binary'], s['State']) for s in json.loads(result.stdout)}
        return {('cinder-scheduler', 'up'), ('cinder-volume', 'up')} <= up_

    wait_for('cinder-scheduler and cinder-volume to report up',
             volume_service_up, lab, 'cinder-volume')


def up(lab: Lab) -> None:
    """Ceph, then Cinder on it; the lab remembers the cluster in
    ``lab.json`` (``storage``) for the hosts added later."""
    t0 = time.monotonic()
    link_bindings()
    state = start_ceph(lab)
    lab.state['storage'] = {k: state[k] for k in ('fsid', 'secret_uuid')}
    lab.save()
    log(f'Ceph: mon, mgr and an OSD up, pool {POOL} '
        f'({time.monotonic() - t0:.0f}s)')
    create_database(lab)
    register_cinder(lab)
    conf = configure_cinder(lab, state)
    start_cinder(lab, conf)
    log(f'Ceph: {ceph(lab, "health").strip()}')
    lab.state['storage']['up_seconds'] = round(time.monotonic() - t0, 1)
    lab.save()
    log(f'Cinder (RBD) up ({lab.state["storage"]["up_seconds"]}s with Ceph)')


# -- compute hosts ------------------------------------------------------


def configure_host(lab: Lab, host: str, enter: list[str]) -> str:
    """``host`` as a Ceph client: ``/etc/ceph`` (in its mount namespace)
    bound to its own copy of ceph.conf and client.cinder's keyring, a
    libvirt secret with that key (libvirtd must be up), and
    nova-compute's RBD options in a config file of their own, whose path
    is returned (nova-compute reads it after its main one)."""
    storage = lab.state['storage']
    d = cloudlab.host_dir(lab, host, 'ceph')
    os.makedirs(d, mode=0o700, exist_ok=True)
    cloudlab.write_ini(os.path.join(d, 'ceph.conf'), ceph_conf(
        lab, storage['fsid'], '/etc/ceph/$cluster.$name.keyring', False))
    key = user_key(lab)
    write_keyring(os.path.join(d, f'ceph.client.{CEPH_USER}.keyring'),
                  f'client.{CEPH_USER}', key)
    if not os.path.isdir('/etc/ceph'):
        raise LabError('no /etc/ceph: apt-get install ceph-common')
    run([*enter, 'mount', '--bind', d, '/etc/ceph'])
    # the libvirt secret QEMU's rbd driver authenticates with
    secret_xml = os.path.join(d, 'secret.xml')
    with open(secret_xml, 'w') as f:
        f.write(f"<secret ephemeral='no' private='yes'>"
                f"<uuid>{storage['secret_uuid']}</uuid>"
                f"<usage type='ceph'><name>client.{CEPH_USER} secret"
                f"</name></usage></secret>")
    value = os.path.join(d, 'secret.b64')
    with open(os.open(value, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
              'w') as f:
        f.write(key)
    virsh = [*enter, 'virsh', '-c', 'qemu:///system']
    run([*virsh, 'secret-define', secret_xml])
    run([*virsh, 'secret-set-value', '--secret', storage['secret_uuid'],
         '--file', value])
    os.unlink(value)
    conf = cloudlab.host_dir(lab, host, 'etc', 'nova-compute-rbd.conf')
    privsep = os.path.join(cloudlab.BIN, 'privsep-helper')
    main_conf = cloudlab.host_dir(lab, host, 'etc', 'nova-compute.conf')
    helper = {'helper_command': f'{privsep} --config-file {main_conf} '
                                f'--config-file {conf}'}
    cloudlab.write_ini(conf, {
        'libvirt': {'rbd_user': CEPH_USER,
                    'rbd_secret_uuid': storage['secret_uuid']},
        'cinder': {**cloudlab.service_auth(lab, 'cinder'),
                   'os_region_name': 'RegionOne'},
        # Cinder refuses to detach a server's volume for a user alone
        # (CVE-2023-2088): nova-compute sends its service token too.
        'service_user': {**cloudlab.service_auth(lab, 'nova'),
                         'send_service_user_token': True},
        # os-brick's connector properties (privsep; no sudo here)
        'privsep_osbrick': helper})
    return conf
