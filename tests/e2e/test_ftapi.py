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

On the tier's shared lab (:mod:`tests.e2e.lab`), whatever hosts other
modules added to it: the servers ask for more memory than any host
offers, so they end in ERROR (no valid host) but belong to their
projects in Nova all the same, which is all the API's policy and project
scoping need. Their live state (agents on hosts) is the unit and
functional tiers' (fakes), and test_reporting.py's.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import urllib.error
import urllib.request
from typing import Any

from tests.e2e import lab
from tests.e2e.lab import VENV_BIN, run

PROJECTS = {'alice': 'ft-e2e-1', 'bob': 'ft-e2e-2'}
#: a flavor no host of the lab can take (they offer 4 GiB each), within
#: a project's default RAM quota with its two servers (50 GiB: more is
#: refused with a 403)
UNSCHEDULABLE_RAM_MB = 16 << 10


class FTAPICloudTest(lab.LabTestCase):

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.api_url = cls.lab.ft_api()
        cls.admin_env = cls.env
        cls.addClassCleanup(cls._delete_servers)
        cls._tenants_and_servers()

    @classmethod
    def _delete_servers(cls) -> None:
        # (the other modules' FT servers are theirs; these go)
        for server_id in getattr(cls, 'ids', {}).values():
            cls.cli(cls.admin_env, 'server', 'delete', '--wait', server_id,
                    check=False)

    @classmethod
    def cli(cls, env: dict[str, str], *args: str,
            check: bool = True) -> subprocess.CompletedProcess:
        argv = [os.path.join(VENV_BIN, 'openstack'), *args]
        result = run(argv, env=env, cwd=cls.tmp)
        if check and result.returncode:
            raise AssertionError(f'openstack {" ".join(args)} exited '
                                 f'{result.returncode}:\n'
                                 f'{result.stderr[-3000:]}')
        return result

    @classmethod
    def cli_json(cls, env: dict[str, str], *args: str) -> Any:
        return json.loads(cls.cli(env, *args, '-f', 'json').stdout)

    @classmethod
    def _tenants_and_servers(cls) -> None:
        admin = cls.admin_env
        image = os.path.join(cls.tmp, 'tiny.raw')
        with open(image, 'wb') as f:
            f.truncate(1 << 20)
        cls.cli(admin, 'image', 'create', '--disk-format', 'raw',
                '--container-format', 'bare', '--public', '--file', image,
                'ft-e2e-tiny')
        cls.cli(admin, 'flavor', 'create', '--ram',
                str(UNSCHEDULABLE_RAM_MB), '--disk', '1', '--vcpus', '1',
                'ft-e2e-flavor')
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
        # all projects: both tenants' FT servers, not alice's plain one
        # (other modules' FT servers in the shared lab are listed too)
        listed = json.loads(self.ft('admin', 'list', '--all-projects',
                                    '-f', 'json').stdout)
        self.assertEqual({self.ids['alice-ft'], self.ids['bob-ft']},
                         {s['ID'] for s in listed} & set(self.ids.values()))
