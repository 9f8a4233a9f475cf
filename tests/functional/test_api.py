"""The FT API as a real HTTP service behind the real auth_token.

Two ways in:

* ``mftvm-api`` started as a process from its console script: the
  version document, a request without a token refused by auth_token, a
  token Keystone cannot check (no Keystone here) a 503, and a bad
  option ending it with one line;
* the same server and pipeline (``mftvm_openstack.cmd.api.serve``,
  ``build_app``) in this process, where keystonemiddleware's own
  ``AuthTokenFixture`` stands in for Keystone's token validation, on a
  fake Nova and fake agents: real tokens' roles and projects through the
  whole middleware, over real HTTP.

The cloud lab's tier (tests/e2e/test_ftapi.py) runs it against a real
Keystone and Nova.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Optional

import testtools
from keystonemiddleware import fixture as ksm_fixture
from oslo_config import cfg

from mftvm_openstack.api import app as api_app
from mftvm_openstack.api import conf as api_conf
from mftvm_openstack.api.service import FTService
from mftvm_openstack.cmd import api as api_cmd
from tests.unit.test_api import (
    OTHER,
    P1,
    P2,
    WEB,
    FakeAgents,
    FakeInventory,
    nova_server,
    protected,
)

BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return int(s.getsockname()[1])


def http(url: str, method: str = 'GET', token: Optional[str] = None,
         body: Any = None, headers: Optional[dict[str, str]] = None
         ) -> tuple[int, dict[str, str], Any]:
    """(status, headers, JSON body or text) of one real HTTP request."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers=dict(headers or {}))
    if token is not None:
        req.add_header('X-Auth-Token', token)
    if data is not None:
        req.add_header('Content-Type', 'application/json')
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            status, hdrs, raw = resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        status, hdrs, raw = exc.code, dict(exc.headers), exc.read()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw.decode(errors='replace')


def authtoken_conf(port: int) -> str:
    return (f'[keystone_authtoken]\n'
            f'www_authenticate_uri = http://127.0.0.1:{port}/identity\n'
            f'auth_url = http://127.0.0.1:{port}/identity\n'
            f'auth_type = password\nusername = mftvm\npassword = x\n'
            f'project_name = service\nuser_domain_name = Default\n'
            f'project_domain_name = Default\n')


class ConsoleScriptTest(testtools.TestCase):
    """``mftvm-api`` as an operator starts it."""

    def start(self, conf_text: str) -> subprocess.Popen[str]:
        tmp = self.useFixture_tmp()
        path = os.path.join(tmp, 'mftvm-api.conf')
        with open(path, 'w') as f:
            f.write(conf_text)
        proc = subprocess.Popen(
            [os.path.join(BIN, 'mftvm-api'), '--config-file', path],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.addCleanup(self._end, proc)
        return proc

    def useFixture_tmp(self) -> str:
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        return tmp.name

    @staticmethod
    def _end(proc: subprocess.Popen[str]) -> None:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()

    def wait_listening(self, proc: subprocess.Popen[str], port: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self.fail(f'mftvm-api exited {proc.returncode}: '
                          f'{proc.stderr.read() if proc.stderr else ""}')
            try:
                with socket.create_connection(('127.0.0.1', port), 0.5):
                    return
            except OSError:
                time.sleep(0.2)
        self.fail('mftvm-api did not listen within 60 s')

    def test_serves_versions_and_refuses_requests_without_a_token(self):
        port, dead = free_port(), free_port()
        proc = self.start(f'[DEFAULT]\ntransport_url = rabbit://u:p@'
                          f'127.0.0.1:{dead}/\n[ft_api]\nbind_host = '
                          f'127.0.0.1\nbind_port = {port}\n'
                          + authtoken_conf(dead))
        self.wait_listening(proc, port)
        base = f'http://127.0.0.1:{port}'
        status, _, body = http(base + '/')
        self.assertEqual((300, 'v1.0', f'{base}/v1/'),
                         (status, body['versions'][0]['id'],
                          body['versions'][0]['links'][0]['href']))
        status, headers, _ = http(base + '/v1/servers')
        self.assertEqual(401, status)
        self.assertEqual(f'Keystone uri="http://127.0.0.1:{dead}/identity"',
                         headers['WWW-Authenticate'])
        # a token it cannot check (Keystone is down) lets nothing through
        status, _, _ = http(base + '/v1/servers', token='a' * 32)
        self.assertEqual(503, status)
        proc.terminate()
        self.assertEqual(0, proc.wait(30))

    def test_a_bad_option_ends_it_with_one_line(self):
        proc = self.start('[ft_api]\nmax_servers = 0\n')
        self.assertEqual(1, proc.wait(60))
        err = proc.stderr.read() if proc.stderr else ''
        self.assertEqual(1, len(err.strip().splitlines()), err)
        self.assertIn('mftvm-api: error: ', err)
        self.assertIn('max_servers', err)


class AuthTokenHTTPTest(testtools.TestCase):
    """The whole pipeline over HTTP, with Keystone's answers faked by
    keystonemiddleware's fixture."""

    def setUp(self) -> None:
        super().setUp()
        self.auth = self.useFixture(ksm_fixture.AuthTokenFixture())
        # (add_token_data returns nothing: the ids are given)
        self.alice, self.admin = 'alice-token', 'admin-token'
        self.auth.add_token_data(
            token_id=self.alice, project_id=P1, user_id='alice',
            role_list=['member', 'reader'])
        self.auth.add_token_data(
            token_id=self.admin, project_id='admin0', user_id='admin',
            role_list=['admin', 'member', 'reader'])
        inventory = FakeInventory([nova_server(WEB, 'web', P1, 'hv1'),
                                   nova_server(OTHER, 'other', P2, 'hv1')])
        self.agents = FakeAgents()
        self.agents.hosts = {'hv1': {WEB: protected(WEB, 'hv1', 'hv2'),
                                     OTHER: protected(OTHER, 'hv1', 'hv2')}}
        conf = cfg.ConfigOpts()
        api_conf.register_opts(conf)
        with tempfile.NamedTemporaryFile('w', suffix='.conf',
                                         delete=False) as f:
            f.write(authtoken_conf(free_port()))
        self.addCleanup(os.unlink, f.name)
        conf(['--config-file', f.name], project='mftvm-test',
             default_config_files=[])
        app = api_app.build_app(conf, FTService(inventory, self.agents))
        server = api_cmd.serve(app, '127.0.0.1', 0)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(server.server_close)
        self.addCleanup(server.shutdown)
        self.base = f'http://127.0.0.1:{server.server_address[1]}/v1'

    def test_a_tenant_sees_its_own_servers_only(self):
        status, _, body = http(self.base + '/servers', token=self.alice)
        self.assertEqual(200, status, body)
        self.assertEqual([WEB], [s['id'] for s in body['servers']])
        self.assertEqual('protected', body['servers'][0]['protection'])
        status, _, body = http(f'{self.base}/servers/{OTHER}',
                               token=self.alice)
        self.assertEqual((404, f'no server {OTHER}'),
                         (status, body['error']['message']))
        status, _, body = http(f'{self.base}/servers?all_projects=true',
                               token=self.alice)
        self.assertEqual(403, status)

    def test_only_an_admin_fails_over(self):
        status, _, body = http(f'{self.base}/servers/{WEB}/action', 'POST',
                               token=self.alice, body={'failover': {}})
        self.assertEqual((403, 'failover is not allowed'),
                         (status, body['error']['message']))
        self.assertNotIn(('failover', 'hv1', WEB), self.agents.calls)
        status, _, body = http(f'{self.base}/servers/{WEB}/action', 'POST',
                               token=self.admin, body={'failover': {}})
        self.assertEqual((200, 'failover'), (status, body['action']))
        self.assertIn(('failover', 'hv1', WEB), self.agents.calls)

    def test_a_bad_token_and_forged_identity_headers(self):
        status, _, _ = http(self.base + '/servers', token='not-a-token')
        self.assertEqual(401, status)
        # auth_token replaces what a client says of itself
        status, _, body = http(
            f'{self.base}/servers/{OTHER}', token=self.alice,
            headers={'X-Project-Id': P2, 'X-Roles': 'admin',
                     'X-Identity-Status': 'Confirmed'})
        self.assertEqual(404, status, body)

    def test_a_body_over_the_bound_is_refused(self):
        status, _, body = http(
            f'{self.base}/servers/{WEB}/action', 'POST', token=self.admin,
            body={'reprotect': {'secondary_host': 'h' * 20000}})
        self.assertEqual(413, status, body)
        self.assertEqual('body: at most 16384 bytes (got 20037)',
                         body['error']['message'])
