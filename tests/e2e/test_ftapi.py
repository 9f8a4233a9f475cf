"""The FT API and ``openstack ft`` against the lab's real Keystone and Nova.

One lab for the class, as in test_cloud.py. ``cloudlab.py ft-api``
starts ``mftvm-api`` in the control namespace with its service user;
the tests register it in the catalog as an operator does (doc/api.rst),
make two tenants (alice in ``ft-e2e-1``, bob in ``ft-e2e-2``) and their
servers, then ask with real tokens, through the real ``openstack`` CLI
(the plugin from the wheel) and plain HTTP::

    alice: openstack ft server list        -> her FT server only
    alice: openstack ft server show BOBS   -> 404
    alice: openstack ft server failover    -> 403
    admin: openstack ft server failover    -> past the policy (409: no
                                              agent protects it here)

The lab has no compute hosts here: the servers end in ERROR (no valid
host) but belong to their projects in Nova all the same, which is all
the API's policy and project scoping need. Their live state (agents on
hosts) is the unit and functional tiers' (fakes) until the lab runs
agents.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from typing import Any

import testtools

from tests.e2e.test_cloud import (
    CLOUDLAB,
    PIP,
    PYTHON,
    ROOT,
    VENV_BIN,
    _checked,
    _run,
)

PROJECTS = {'alice': 'ft-e2e-1', 'bob': 'ft-e2e-2'}


class FTAPICloudTest(testtools.TestCase):

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        if os.geteuid() != 0:
            raise RuntimeError('the e2e tier needs root (network namespaces)')
        if not os.path.exists(PYTHON):
            raise RuntimeError(f'no {PYTHON}: run tools/run.sh test, which '
                               f'makes .cloud-venv')
        cls.tmp = tempfile.mkdtemp(prefix='mftvm-e2e-ftapi-')
        cls.lab_dir = os.path.join(cls.tmp, 'lab')
        try:
            cls._install_wheel()
            with open(os.path.join(cls.tmp, 'up.log'), 'w') as out:
                result = subprocess.run(
                    [PYTHON, CLOUDLAB, 'up', '--dir', cls.lab_dir,
                     '--name', f'p{os.getpid()}'],
                    stdout=out, stderr=subprocess.STDOUT, timeout=900)
            if result.returncode:
                with open(os.path.join(cls.tmp, 'up.log')) as f:
                    raise RuntimeError(f'cloudlab up failed:\n'
                                       f'{f.read()[-6000:]}')
            cls.api_url = _checked(
                [PYTHON, CLOUDLAB, 'ft-api', '--dir', cls.lab_dir],
                timeout=600).stdout.strip().splitlines()[-1]
            cls.admin_env = cls._openrc()
            cls._register_endpoint()
            cls._tenants_and_servers()
        except BaseException:
            cls._tear_down()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        cls._tear_down()
        super().tearDownClass()

    @classmethod
    def _tear_down(cls) -> None:
        if os.path.exists(os.path.join(cls.lab_dir, 'lab.json')):
            _run([PYTHON, CLOUDLAB, 'down', '--dir', cls.lab_dir])
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def _install_wheel(cls) -> None:
        out = os.path.join(cls.tmp, 'wheel')
        _checked([*PIP, 'wheel', '--no-deps', '--no-build-isolation',
                  '-w', out, ROOT], cwd=cls.tmp)
        (wheel,) = [os.path.join(out, name) for name in os.listdir(out)]
        _checked([*PIP, 'install', '--no-deps', '--force-reinstall', wheel])

    @classmethod
    def _openrc(cls) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith('OS_')}
        env['PATH'] = f'{VENV_BIN}:{env.get("PATH", os.defpath)}'
        with open(os.path.join(cls.lab_dir, 'openrc')) as f:
            for line in f:
                key, _, value = line.removeprefix('export ').strip(
                    ).partition('=')
                if key.startswith('OS_'):
                    env[key] = value
        return env

    @classmethod
    def cli(cls, env: dict[str, str], *args: str,
            check: bool = True) -> subprocess.CompletedProcess:
        argv = [os.path.join(VENV_BIN, 'openstack'), *args]
        result = _run(argv, env=env, cwd=cls.tmp)
        if check and result.returncode:
            raise AssertionError(f'openstack {" ".join(args)} exited '
                                 f'{result.returncode}:\n'
                                 f'{result.stderr[-3000:]}')
        return result

    @classmethod
    def cli_json(cls, env: dict[str, str], *args: str) -> Any:
        return json.loads(cls.cli(env, *args, '-f', 'json').stdout)

    @classmethod
    def _register_endpoint(cls) -> None:
        """The operator's step of doc/api.rst."""
        admin = cls.admin_env
        cls.cli(admin, 'service', 'create', '--name', 'mftvm',
                '--description', 'Fault-tolerant servers', 'fault-tolerance')
        for interface in ('public', 'internal', 'admin'):
            cls.cli(admin, 'endpoint', 'create', '--region', 'RegionOne',
                    'fault-tolerance', interface, cls.api_url)

    @classmethod
    def _tenants_and_servers(cls) -> None:
        admin = cls.admin_env
        image = os.path.join(cls.tmp, 'tiny.raw')
        with open(image, 'wb') as f:
            f.truncate(1 << 20)
        cls.cli(admin, 'image', 'create', '--disk-format', 'raw',
                '--container-format', 'bare', '--public', '--file', image,
                'ft-e2e-tiny')
        cls.cli(admin, 'flavor', 'create', '--ram', '128', '--disk', '1',
                '--vcpus', '1', 'ft-e2e-flavor')
        cls.envs: dict[str, dict[str, str]] = {}
        for user, project in PROJECTS.items():
            password = secrets.token_hex(12)
            cls.cli(admin, 'project', 'create', '--domain', 'default',
                    project)
            cls.cli(admin, 'user', 'create', '--domain', 'default',
                    '--password', password, user)
            cls.cli(admin, 'role', 'add', '--project', project, '--user',
                    user, 'member')
            cls.envs[user] = {**admin, 'OS_USERNAME': user,
                              'OS_PASSWORD': password,
                              'OS_PROJECT_NAME': project}
        cls.ids: dict[str, str] = {}
        for user, name, ft in (('alice', 'alice-ft', True),
                               ('alice', 'alice-plain', False),
                               ('bob', 'bob-ft', True)):
            args = ['--os-compute-api-version', '2.47', 'server', 'create',
                    '--image', 'ft-e2e-tiny', '--flavor', 'ft-e2e-flavor',
                    '--nic', 'none']
            if ft:
                args += ['--property', 'ft=true']
            cls.ids[name] = cls.cli_json(cls.envs[user], *args, name)['id']

    def token(self, user: str) -> str:
        env = self.envs[user] if user in self.envs else self.admin_env
        return self.cli(env, 'token', 'issue', '-f', 'value', '-c',
                        'id').stdout.strip()

    def http(self, path: str, token: str | None = None,
             ) -> tuple[int, Any]:
        req = urllib.request.Request(self.api_url + path)
        if token is not None:
            req.add_header('X-Auth-Token', token)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b'null')

    def ft(self, user: str, *args: str,
           check: bool = True) -> subprocess.CompletedProcess:
        env = self.envs[user] if user in self.envs else self.admin_env
        return self.cli(env, 'ft', 'server', *args, check=check)

    # -- the tests ---------------------------------------------------------

    def test_the_catalog_and_the_version_document(self):
        catalog = {e['Type']: e for e in self.cli_json(self.admin_env,
                                                       'catalog', 'list')}
        self.assertIn('fault-tolerance', catalog)
        status, body = self.http('/')
        self.assertEqual((300, 'v1.0'), (status, body['versions'][0]['id']))
        self.assertEqual(401, self.http('/v1/servers')[0])

    def test_a_tenant_lists_its_own_ft_servers(self):
        listed = json.loads(self.ft('alice', 'list', '-f', 'json').stdout)
        self.assertEqual([self.ids['alice-ft']], [s['ID'] for s in listed])
        self.assertEqual('unprotected', listed[0]['Protection'])
        status, body = self.http('/v1/servers', self.token('bob'))
        self.assertEqual(200, status)
        self.assertEqual([self.ids['bob-ft']],
                         [s['id'] for s in body['servers']])
        shown = json.loads(self.ft('alice', 'show', 'alice-ft', '-f',
                                   'json').stdout)
        self.assertEqual((self.ids['alice-ft'], 'alice-ft'),
                         (shown['id'], shown['name']))

    def test_a_tenant_is_refused_another_projects_server(self):
        bobs = self.ids['bob-ft']
        result = self.ft('alice', 'show', bobs, check=False)
        self.assertNotEqual(0, result.returncode)
        self.assertIn(f'no server {bobs} (HTTP 404)', result.stderr)
        status, body = self.http(f'/v1/servers/{bobs}', self.token('alice'))
        self.assertEqual((404, f'no server {bobs}'),
                         (status, body['error']['message']))
        result = self.ft('alice', 'list', '--all-projects', check=False)
        self.assertIn('(HTTP 403)', result.stderr)

    def test_admin_may_fail_over_a_tenant_may_not(self):
        result = self.ft('alice', 'failover', 'alice-ft', check=False)
        self.assertNotEqual(0, result.returncode)
        self.assertIn('failover is not allowed (HTTP 403)', result.stderr)
        # the admin passes the policy; the server has no FT side on a
        # host (it never ran), which the agent would have to fail over
        result = self.ft('admin', 'failover', self.ids['alice-ft'],
                         check=False)
        self.assertIn(f'server {self.ids["alice-ft"]} has no FT side on '
                      f'its host (none) (HTTP 409)', result.stderr)
        listed = json.loads(self.ft('admin', 'list', '--all-projects',
                                    '-f', 'json').stdout)
        self.assertEqual({self.ids['alice-ft'], self.ids['bob-ft']},
                         {s['ID'] for s in listed})
