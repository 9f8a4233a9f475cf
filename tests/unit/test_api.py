"""The FT API: policy, input checks, views of the agents' status.

The application runs bare (no auth_token: the ``X-*`` identity headers
auth_token would set are given here), on a fake Nova and fake agents.
tests/functional/test_api.py runs it behind the real auth_token over
real HTTP.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Optional

import testtools
import webob
from oslo_config import cfg
from oslo_policy import opts as policy_opts

from mftvm_openstack.agent import exception as agent_exc
from mftvm_openstack.api import app as api_app
from mftvm_openstack.api import conf as api_conf
from mftvm_openstack.api import policy
from mftvm_openstack.api.inventory import (
    InventoryError,
    NovaInventory,
    NovaServer,
)
from mftvm_openstack.api.service import FTService, view
from mftvm_openstack.contract.ftapi import (
    ActionName,
    FTServer,
    Protection,
    ServerAction,
)
from mftvm_openstack.contract.record import ContractError
from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import InstanceStatus

P1, P2 = 'aaaa1111', 'bbbb2222'
WEB = '0b6c1d2e-0000-4000-8000-000000000001'     # P1, protected on hv1
DB = '0b6c1d2e-0000-4000-8000-000000000002'      # P1, unprotected on hv2
PLAIN = '0b6c1d2e-0000-4000-8000-000000000003'   # P1, not FT
OTHER = '0b6c1d2e-0000-4000-8000-000000000004'   # P2, protected on hv1
NOWHERE = '0b6c1d2e-0000-4000-8000-00000000dead'


def nova_server(id_: str, name: str, project: str, host: Optional[str],
                ft: bool = True) -> NovaServer:
    return NovaServer(id=id_, name=name, project_id=project, host=host,
                      instance_name=f'instance-{id_[-4:]}', memory_mib=256,
                      vcpus=1, ft_requested=ft)


def protected(instance: str, host: str, peer: str) -> InstanceStatus:
    return InstanceStatus(
        role=Role.PRIMARY, state=State.PROTECTED, alive=True, epochs=120,
        last_committed_epoch=118, replication_lag_epochs=2,
        pause_ms_p50=11.5, pause_ms_p99=40.25, ms_since_last_ack=180.0,
        updated=1700000000.0, state_since=1699999000.0, instance=instance,
        host=host, peer=peer)


class FakeInventory:
    def __init__(self, servers: list[NovaServer]) -> None:
        self.by_id = {s.id: s for s in servers}
        self.asked: list[tuple[Optional[str], int]] = []
        self.down = False

    def servers(self, project_id: Optional[str],
                limit: int) -> list[NovaServer]:
        if self.down:
            raise InventoryError('cannot reach Nova: ConnectFailure')
        self.asked.append((project_id, limit))
        return [s for s in self.by_id.values()
                if project_id is None or s.project_id == project_id][:limit]

    def server(self, server_id: str) -> Optional[NovaServer]:
        if self.down:
            raise InventoryError('cannot reach Nova: ConnectFailure')
        return self.by_id.get(server_id)


class FakeAgents:
    def __init__(self) -> None:
        self.hosts: dict[str, dict[str, InstanceStatus]] = {}
        self.unreachable: set[str] = set()
        self.calls: list[tuple[Any, ...]] = []
        self.action_error: Optional[Exception] = None
        self.failover_reply: dict[str, Any] = {}

    def _host(self, host: str) -> dict[str, InstanceStatus]:
        if host in self.unreachable:
            raise agent_exc.PeerUnreachable(host=host, reason='no answer')
        return self.hosts.get(host, {})

    def list(self, ctxt: Any, host: str) -> list[dict[str, Any]]:
        self.calls.append(('list', host))
        return [st.to_dict() for st in self._host(host).values()]

    def status(self, ctxt: Any, host: str, instance: str) -> dict[str, Any]:
        self.calls.append(('status', host, instance))
        try:
            return self._host(host)[instance].to_dict()
        except KeyError:
            raise agent_exc.InstanceNotFound(instance=instance) from None

    def failover(self, ctxt: Any, host: str, instance: str) -> Any:
        self.calls.append(('failover', host, instance))
        if self.action_error is not None:
            raise self.action_error
        return self.failover_reply or {'instance': instance, 'host': host,
                                       'runs_on': 'hv3'}

    def protect(self, ctxt: Any, host: str, instance: str, spec: Any,
                options: Any, secondary_host: Optional[str] = None) -> Any:
        self.calls.append(('protect', host, instance, spec.to_dict(),
                           options.to_dict(), secondary_host))
        if self.action_error is not None:
            raise self.action_error
        return {}


def make_conf(policy_file: Optional[str] = None) -> cfg.ConfigOpts:
    conf = cfg.ConfigOpts()
    api_conf.register_opts(conf)
    conf([], project='mftvm-test', default_config_files=[])
    conf.set_override('max_servers', 50, group='ft_api')
    conf.set_override('max_request_body_bytes', 200, group='ft_api')
    if policy_file is not None:
        policy_opts.set_defaults(conf, policy_file=policy_file)
    return conf


class APITestCase(testtools.TestCase):

    def setUp(self) -> None:
        super().setUp()
        self.inventory = FakeInventory([
            nova_server(WEB, 'web', P1, 'hv1'),
            nova_server(DB, 'db', P1, 'hv2'),
            nova_server(PLAIN, 'plain', P1, 'hv1', ft=False),
            nova_server(OTHER, 'other', P2, 'hv1'),
        ])
        self.agents = FakeAgents()
        self.agents.hosts = {
            'hv1': {WEB: protected(WEB, 'hv1', 'hv3'),
                    OTHER: protected(OTHER, 'hv1', 'hv2')},
            'hv2': {DB: InstanceStatus(
                role=Role.PRIMARY, state=State.UNPROTECTED, alive=True,
                state_since=1699990000.0, reason='secondary lost',
                instance=DB, host='hv2', peer='hv1')},
        }
        self.app = self.make_app()

    def make_app(self, conf: Optional[cfg.ConfigOpts] = None) -> Any:
        conf = conf or make_conf()
        service = FTService(self.inventory, self.agents, max_hosts=10)
        return api_app.FTApp(service, policy.get_enforcer(conf), conf)

    def request(self, path: str, method: str = 'GET', project: str = P1,
                roles: str = 'reader,member', body: Any = None,
                raw: Optional[bytes] = None, confirmed: bool = True,
                content_type: str = 'application/json',
                app: Any = None) -> webob.Response:
        headers = {'X-Project-Id': project, 'X-Roles': roles,
                   'X-User-Id': 'u1'}
        if confirmed:
            headers['X-Identity-Status'] = 'Confirmed'
        req = webob.Request.blank(path, method=method, headers=headers)
        if body is not None or raw is not None:
            req.content_type = content_type
            req.body = raw if raw is not None else json.dumps(body).encode()
        return req.get_response(app or self.app)

    def admin(self, path: str, **kwargs: Any) -> webob.Response:
        return self.request(path, roles='admin,member,reader', **kwargs)

    def assertError(self, status: int, message: str,
                    resp: webob.Response) -> None:
        self.assertEqual((status, 'application/json'),
                         (resp.status_code, resp.content_type), resp.text)
        self.assertEqual(message, resp.json['error']['message'])
        self.assertEqual(status, resp.json['error']['code'])


class PolicyTest(APITestCase):

    def test_a_tenant_lists_its_own_projects_ft_servers(self):
        resp = self.request('/v1/servers')
        self.assertEqual(200, resp.status_code, resp.text)
        ids = [s['id'] for s in resp.json['servers']]
        self.assertEqual([WEB, DB], ids)
        self.assertEqual([(P1, 50)], self.inventory.asked)

    def test_a_tenant_may_not_list_another_project(self):
        self.assertError(403, 'listing another project\'s servers is not '
                         'allowed',
                         self.request(f'/v1/servers?project_id={P2}'))
        self.assertError(403, 'listing another project\'s servers is not '
                         'allowed',
                         self.request('/v1/servers?all_projects=true'))
        self.assertEqual([], self.inventory.asked)

    def test_an_admin_lists_any_project(self):
        resp = self.admin('/v1/servers?all_projects=true')
        self.assertEqual({WEB, DB, OTHER},
                         {s['id'] for s in resp.json['servers']})
        resp = self.admin(f'/v1/servers?project_id={P2}')
        self.assertEqual([OTHER], [s['id'] for s in resp.json['servers']])
        self.assertEqual([(None, 50), (P2, 50)], self.inventory.asked)

    def test_a_tenant_is_told_another_projects_server_does_not_exist(self):
        theirs = self.request(f'/v1/servers/{OTHER}')
        missing = self.request(f'/v1/servers/{NOWHERE}')
        self.assertError(404, f'no server {OTHER}', theirs)
        self.assertError(404, f'no server {NOWHERE}', missing)
        self.assertNotIn(('status', 'hv1', OTHER), self.agents.calls)
        refused = self.request(f'/v1/servers/{OTHER}/action', 'POST',
                               body={'failover': {}})
        self.assertError(404, f'no server {OTHER}', refused)
        self.assertNotIn(('failover', 'hv1', OTHER), self.agents.calls)

    def test_a_tenant_may_not_fail_over_or_reprotect_its_own(self):
        for action in ('failover', 'reprotect'):
            resp = self.request(f'/v1/servers/{WEB}/action', 'POST',
                                body={action: {}})
            self.assertError(403, f'{action} is not allowed', resp)
        self.assertEqual([], [c for c in self.agents.calls
                              if c[0] in ('failover', 'protect')])

    def test_an_admin_fails_a_server_over(self):
        resp = self.admin(f'/v1/servers/{OTHER}/action', method='POST',
                          body={'failover': None})
        self.assertEqual(200, resp.status_code, resp.text)
        self.assertEqual(('failover', 'hv3', OTHER),
                         (resp.json['action'], resp.json['runs_on'],
                          resp.json['server']['id']))
        self.assertIn(('failover', 'hv1', OTHER), self.agents.calls)

    def test_identity_headers_count_only_once_auth_token_confirmed(self):
        resp = self.request('/v1/servers', roles='admin', confirmed=False)
        self.assertError(403, 'no confirmed identity (is auth_token in the '
                         'pipeline?)', resp)

    def test_a_token_without_a_project_is_refused(self):
        self.assertError(403, 'a project-scoped token is needed',
                         self.request('/v1/servers', project=''))

    def test_without_a_reader_role_nothing_is_shown(self):
        self.assertError(403, 'listing FT servers is not allowed',
                         self.request('/v1/servers', roles='nobody'))
        self.assertError(404, f'no server {WEB}',
                         self.request(f'/v1/servers/{WEB}', roles='nobody'))

    def test_an_operator_may_let_members_fail_over(self):
        with tempfile.NamedTemporaryFile('w', suffix='.yaml',
                                         delete=False) as f:
            f.write('"ft:server:failover": "role:member and '
                    'project_id:%(project_id)s"\n')
        self.addCleanup(os.unlink, f.name)
        app = self.make_app(make_conf(policy_file=f.name))
        resp = self.request(f'/v1/servers/{WEB}/action', 'POST',
                            body={'failover': {}}, app=app)
        self.assertEqual(200, resp.status_code, resp.text)
        resp = self.request(f'/v1/servers/{WEB}/action', 'POST',
                            body={'reprotect': {}}, app=app)
        self.assertError(403, 'reprotect is not allowed', resp)

    def test_every_rule_is_documented_with_its_default(self):
        rules = {r.name: r for r in policy.list_rules()}
        self.assertEqual({policy.LIST, policy.LIST_ALL_PROJECTS,
                          policy.SHOW, policy.FAILOVER, policy.REPROTECT},
                         set(rules))
        self.assertEqual('role:admin', rules[policy.FAILOVER].check_str)
        self.assertEqual('role:admin', rules[policy.REPROTECT].check_str)
        for rule in rules.values():
            self.assertTrue(rule.description and rule.operations)


class InputTest(APITestCase):

    def test_bad_query_parameters(self):
        cases = {
            'limit=0': "limit: must be an integer from 1 to 50 (got '0')",
            'limit=51': "limit: must be an integer from 1 to 50 (got '51')",
            'limit=1e3': "limit: must be an integer from 1 to 50 "
                         "(got '1e3')",
            'limit=-1': "limit: must be an integer from 1 to 50 (got '-1')",
            'all_projects=maybe': "all_projects: must be true or false "
                                  "(got 'maybe')",
            'project_id=a%2Fb': "project_id: must match [A-Za-z0-9_-]{1,64} "
                                "(got 'a/b')",
            'limit=1&limit=2': 'query parameter limit given more than once',
            'sort=name': "unknown query parameter 'sort' (parameters: "
                         "limit, all_projects, project_id)",
            f'all_projects=1&project_id={P2}':
                'all_projects and project_id: give one of them, not both',
        }
        for query, message in cases.items():
            self.assertError(400, message,
                             self.admin(f'/v1/servers?{query}'))
        self.assertEqual([], self.inventory.asked)

    def test_a_limit_bounds_the_listing(self):
        resp = self.request('/v1/servers?limit=1')
        self.assertEqual(1, len(resp.json['servers']))
        self.assertEqual([(P1, 1)], self.inventory.asked)

    def test_a_server_id_must_be_a_uuid(self):
        for bad in ('x', '..', 'vm0', WEB + '0', '%00'):
            resp = self.request(f'/v1/servers/{bad}')
            self.assertEqual(400, resp.status_code, bad)
            self.assertIn('server id: must be a UUID', resp.text)

    def test_unknown_server_and_path_and_method(self):
        self.assertError(404, f'no server {NOWHERE}',
                         self.request(f'/v1/servers/{NOWHERE}'))
        self.assertError(404, "no resource '/v1/flavors'",
                         self.request('/v1/flavors'))
        resp = self.request('/v1/servers', method='DELETE')
        self.assertError(405, 'DELETE is not allowed on /v1/servers; use '
                         'GET', resp)
        self.assertEqual('GET', resp.headers['Allow'])

    def test_a_server_that_does_not_ask_for_ft_is_not_shown(self):
        self.assertError(404, f'server {PLAIN} is not fault tolerant',
                         self.request(f'/v1/servers/{PLAIN}'))

    def test_bad_action_bodies(self):
        path = f'/v1/servers/{WEB}/action'
        cases = [
            ({'reboot': {}}, "body: unknown action 'reboot' (actions: "
                             "failover, reprotect)"),
            ({}, 'body: must name exactly one action (failover, '
                 'reprotect), got 0'),
            ({'failover': {}, 'reprotect': {}},
             'body: must name exactly one action (failover, reprotect), '
             'got 2'),
            ([], 'body: must be a JSON object (got list)'),
            ({'failover': {'force': True}},
             'failover.force: is not a field of Failover (fields: )'),
            ({'failover': 'now'},
             'failover: must be a JSON object (got str)'),
            ({'reprotect': {'secondary_host': 'a b'}},
             "reprotect.secondary_host: must match "
             "[A-Za-z0-9][A-Za-z0-9_.-]{0,254} (got 'a b')"),
            ({'reprotect': {'secondary_host': None}},
             'reprotect.secondary_host: must not be null (leave it out for '
             'the default)'),
        ]
        for body, message in cases:
            self.assertError(400, message,
                             self.admin(path, method='POST', body=body))
        self.assertError(400, 'body: not JSON (Expecting value: line 1 '
                         'column 1 (char 0))',
                         self.admin(path, method='POST', raw=b'nope'))
        self.assertError(400, "Content-Type: must be application/json "
                         "(got 'text/plain')",
                         self.admin(path, method='POST', raw=b'{}',
                                    content_type='text/plain'))
        self.assertEqual([], [c for c in self.agents.calls
                              if c[0] in ('failover', 'protect')])

    def test_a_body_over_the_bound_is_refused_unread(self):
        req = webob.Request.blank(
            f'/v1/servers/{WEB}/action', method='POST',
            headers={'X-Identity-Status': 'Confirmed', 'X-Project-Id': P1,
                     'X-Roles': 'admin', 'Content-Type': 'application/json',
                     'Content-Length': '201'})

        class Unreadable:
            def read(self, *args: Any) -> bytes:
                raise AssertionError('the body was read')
        req.environ['wsgi.input'] = Unreadable()
        self.assertError(413, 'body: at most 200 bytes (got 201)',
                         req.get_response(self.app))
        del req.headers['Content-Length']
        self.assertError(400, 'Content-Length: required (a body of at most '
                         '200 bytes)', req.get_response(self.app))

    def test_a_reprotect_may_not_name_the_servers_own_host(self):
        self.assertError(400, 'reprotect.secondary_host: must not be the '
                         'server\'s own host (hv2)',
                         self.admin(f'/v1/servers/{DB}/action',
                                    method='POST', body={
                                        'reprotect': {
                                            'secondary_host': 'hv2'}}))


class ViewTest(APITestCase):

    def test_a_protected_server_shows_its_live_state(self):
        resp = self.request(f'/v1/servers/{WEB}')
        self.assertEqual(200, resp.status_code, resp.text)
        server = FTServer.from_dict(resp.json['server'])
        self.assertEqual(FTServer(
            id=WEB, name='web', project_id=P1,
            protection=Protection.PROTECTED, state=State.PROTECTED,
            primary_host='hv1', secondary_host='hv3',
            last_committed_epoch=118, replication_lag_epochs=2,
            pause_ms_p50=11.5, pause_ms_p99=40.25,
            ms_since_last_commit=180.0, unprotected_since=None,
            updated=1700000000.0), server)

    def test_protected_counts_from_the_first_committed_epoch(self):
        # The engine is PROTECTED once synced, before its secondary acks
        # an epoch (seen in the lab: 5.5 s before reprotect.end); the
        # agents' notifications and Nova's ft_status count protection
        # from the first committed epoch on, and so does the API.
        self.agents.hosts['hv1'][WEB] = dataclasses.replace(
            self.agents.hosts['hv1'][WEB], last_committed_epoch=0)
        server = FTServer.from_dict(
            self.request(f'/v1/servers/{WEB}').json['server'])
        self.assertEqual((Protection.SYNCING, State.PROTECTED),
                         (server.protection, server.state))

    def test_an_unprotected_server_says_since_when_and_why(self):
        server = FTServer.from_dict(
            self.request(f'/v1/servers/{DB}').json['server'])
        self.assertEqual((Protection.UNPROTECTED, State.UNPROTECTED,
                          1699990000.0, 'secondary lost', 'hv1'),
                         (server.protection, server.state,
                          server.unprotected_since, server.reason,
                          server.secondary_host))

    def test_an_unreachable_agent_makes_only_its_servers_unknown(self):
        self.agents.unreachable.add('hv2')
        resp = self.request('/v1/servers')
        self.assertEqual(200, resp.status_code)
        by_id = {s['id']: s for s in resp.json['servers']}
        self.assertEqual('protected', by_id[WEB]['protection'])
        self.assertEqual('unknown', by_id[DB]['protection'])
        self.assertEqual('the agent on hv2 could not be asked: the agent '
                         'on host hv2 is unreachable: no answer',
                         by_id[DB]['error'])
        # one question per host, not per server
        self.assertEqual(2, len([c for c in self.agents.calls
                                 if c[0] == 'list']))

    def test_nova_down_is_a_503(self):
        self.inventory.down = True
        self.assertError(503, 'Nova: cannot reach Nova: ConnectFailure',
                         self.request('/v1/servers'))

    def test_views_of_the_other_cases(self):
        web = nova_server(WEB, 'web', P1, 'hv1')
        self.assertEqual(
            (Protection.UNPROTECTED, 'no FT agent runs a side of it on its '
             'host'),
            (view(web, None).protection, view(web, None).reason))
        dead = InstanceStatus(role=Role.PRIMARY, state=State.PROTECTED,
                              alive=False, instance=WEB, host='hv1')
        self.assertEqual(
            (Protection.UNKNOWN, 'its primary instance process has ended '
             '(protected)'),
            (view(web, dead).protection, view(web, dead).reason))
        standby = InstanceStatus(role=Role.SECONDARY, state=State.STANDBY,
                                 alive=True, instance=WEB, host='hv1',
                                 peer='hv0')
        self.assertEqual(('hv0', 'hv1', Protection.UNKNOWN),
                         (view(web, standby).primary_host,
                          view(web, standby).secondary_host,
                          view(web, standby).protection))
        active = InstanceStatus(role=Role.SECONDARY, state=State.ACTIVE,
                                alive=True, state_since=5.0)
        self.assertEqual((Protection.UNPROTECTED, 5.0),
                         (view(web, active).protection,
                          view(web, active).unprotected_since))
        long_error = view(web, None, error='x' * 5000).error
        self.assertEqual(1024, len(long_error))

    def test_failover_needs_a_protected_server(self):
        resp = self.admin(f'/v1/servers/{DB}/action', method='POST',
                          body={'failover': {}})
        self.assertError(409, f'server {DB} is unprotected on hv2: only a '
                         f'protected server can fail over', resp)

    def test_agent_errors_of_an_action(self):
        path = f'/v1/servers/{WEB}/action'
        self.agents.action_error = agent_exc.Conflict(instance=WEB,
                                                      reason='busy')
        self.assertError(409, f'instance {WEB}: busy',
                         self.admin(path, method='POST',
                                    body={'failover': {}}))
        self.agents.action_error = agent_exc.PeerUnreachable(
            host='hv1', reason='no answer to failover within 120 s')
        self.assertError(503, 'the agent on host hv1 is unreachable: no '
                         'answer to failover within 120 s',
                         self.admin(path, method='POST',
                                    body={'failover': {}}))
        self.agents.action_error = None
        self.agents.failover_reply = {'instance': WEB, 'host': 'hv1',
                                      'runs_on': 'not a host!'}
        resp = self.admin(path, method='POST', body={'failover': {}})
        self.assertEqual(502, resp.status_code)
        self.assertIn('answered a failover this API cannot read',
                      resp.json['error']['message'])

    def test_reprotect_asks_the_primarys_agent(self):
        resp = self.admin(f'/v1/servers/{DB}/action', method='POST',
                          body={'reprotect': {'secondary_host': 'hv3'}})
        self.assertEqual(200, resp.status_code, resp.text)
        self.assertEqual('reprotect', resp.json['action'])
        self.assertIn(('protect', 'hv2', DB,
                       {'name': DB, 'domain': 'instance-0002',
                        'memory_mib': 256, 'smp': 1, 'kernel': '',
                        'initrd': '', 'disk': '',
                        'append': 'console=ttyS0 quiet',
                        'disk_format': 'raw', 'disk_size': 0,
                        'forwards': [], 'accel': 'tcg'},
                       {}, 'hv3'), self.agents.calls)
        resp = self.admin(f'/v1/servers/{WEB}/action', method='POST',
                          body={'reprotect': {}})
        self.assertError(409, f'server {WEB} is protected on hv1: only a '
                         f'server that runs unprotected can be '
                         f're-protected', resp)


class VersionTest(APITestCase):

    def test_the_root_answers_the_versions_without_a_token(self):
        def refuse(environ: Any, start_response: Any) -> Any:
            raise AssertionError('the root went through auth')
        root = api_app.Root(refuse)
        resp = webob.Request.blank('/').get_response(root)
        self.assertEqual(300, resp.status_code)
        self.assertEqual({'versions': [{
            'id': 'v1.0', 'status': 'CURRENT', 'links': [
                {'rel': 'self', 'href': 'http://localhost/v1/'}]}]},
            resp.json)
        resp = webob.Request.blank('/', method='POST').get_response(root)
        self.assertEqual(405, resp.status_code)

    def test_v1_answers_its_version(self):
        resp = self.request('/v1/')
        self.assertEqual('v1.0', resp.json['version']['id'])


class FakeResponse:
    def __init__(self, status: int, body: Any) -> None:
        self.status_code = status
        self.body = body

    def json(self) -> Any:
        if isinstance(self.body, bytes):
            raise ValueError('not JSON')
        return self.body


class FakeAdapter:
    def __init__(self, pages: dict[str, FakeResponse]) -> None:
        self.pages = pages
        self.asked: list[tuple[str, Optional[str]]] = []

    def get(self, url: str, microversion: Optional[str] = None,
            raise_exc: bool = True) -> FakeResponse:
        self.asked.append((url, microversion))
        return self.pages.get(url, FakeResponse(404, {}))


def nova_json(id_: str, **extra: Any) -> dict[str, Any]:
    data = {'id': id_, 'name': 'web', 'tenant_id': P1,
            'OS-EXT-SRV-ATTR:host': 'hv1',
            'OS-EXT-SRV-ATTR:instance_name': 'instance-00000001',
            'flavor': {'ram': 512, 'vcpus': 2,
                       'extra_specs': {'ft:enabled': 'true'}},
            'metadata': {}, 'status': 'ACTIVE', 'addresses': {}}
    data.update(extra)
    return data


class NovaInventoryTest(testtools.TestCase):

    def test_servers_of_a_project_over_pages(self):
        first = f'/servers/detail?all_tenants=1&limit=3&project_id={P1}'
        adapter = FakeAdapter({
            first: FakeResponse(200, {
                'servers': [nova_json(WEB), nova_json(
                    DB, flavor={'ram': 64, 'vcpus': 1},
                    metadata={'ft': 'yes'})],
                'servers_links': [{'rel': 'next', 'href':
                                   'http://nova/v2.1/servers/detail?'
                                   'marker=x&limit=3'}]}),
            '/servers/detail?marker=x&limit=3': FakeResponse(200, {
                'servers': [nova_json(PLAIN, flavor={}, metadata={}),
                            nova_json(OTHER)]}),
        })
        servers = NovaInventory(adapter).servers(P1, 3)
        self.assertEqual([(WEB, True, 512, 2), (DB, True, 64, 1),
                          (PLAIN, False, 0, 0)],
                         [(s.id, s.ft_requested, s.memory_mib, s.vcpus)
                          for s in servers])
        self.assertEqual(('2.47', '2.47'),
                         tuple(m for _, m in adapter.asked))

    def test_one_server(self):
        adapter = FakeAdapter({f'/servers/{WEB}': FakeResponse(
            200, {'server': nova_json(WEB, metadata={'ft': 'maybe'},
                                      flavor={})})})
        inventory = NovaInventory(adapter)
        server = inventory.server(WEB)
        self.assertEqual(('hv1', 'instance-00000001', True),
                         (server.host, server.instance_name,
                          server.ft_requested))
        self.assertIsNone(inventory.server(NOWHERE))

    def test_what_nova_answers_is_checked(self):
        cases = [
            (FakeResponse(500, {}), 'Nova answered 500 to GET /servers/'
                                    f'{WEB}'),
            (FakeResponse(200, b'<html>'), 'Nova answered what is not JSON'),
            (FakeResponse(200, {'server': nova_json(
                WEB, **{'OS-EXT-SRV-ATTR:host': 'a/b'})}),
             'Nova answered a server this API cannot read: server.host: '
             'must match [A-Za-z0-9][A-Za-z0-9_.-]{0,254} (got \'a/b\')'),
            (FakeResponse(200, {'server': nova_json('x')}),
             'Nova answered a server this API cannot read: server.id: '
             'must match'),
        ]
        for response, message in cases:
            inventory = NovaInventory(FakeAdapter(
                {f'/servers/{WEB}': response}))
            exc = self.assertRaises(InventoryError, inventory.server, WEB)
            self.assertTrue(str(exc).startswith(message), str(exc))

    def test_an_unreachable_nova(self):
        class Down:
            def get(self, *args: Any, **kwargs: Any) -> Any:
                raise ConnectionError('refused')
        exc = self.assertRaises(InventoryError,
                                NovaInventory(Down()).servers, None, 5)
        self.assertEqual('cannot reach Nova: ConnectionError: refused',
                         str(exc))


class ContractTest(testtools.TestCase):

    def test_actions(self):
        self.assertEqual(ServerAction(action=ActionName.FAILOVER),
                         ServerAction.from_body({'failover': None}))
        action = ServerAction.from_body(
            {'reprotect': {'secondary_host': 'hv2'}})
        self.assertEqual('hv2', action.reprotect.secondary_host)
        self.assertRaises(ContractError, ServerAction.from_body,
                          'failover')

    def test_server_records_are_checked_on_the_way_in(self):
        good = FTServer(id=WEB, name='web', project_id=P1,
                        protection=Protection.PROTECTED).to_dict()
        self.assertEqual(good, FTServer.from_dict(good).to_dict())
        for key, value in (('protection', 'fine'), ('primary_host', 'a b'),
                           ('last_committed_epoch', -1),
                           ('name', 'x' * 256), ('state', 'happy')):
            self.assertRaises(ContractError, FTServer.from_dict,
                              {**good, key: value})


class ConfTest(testtools.TestCase):

    def test_every_option_is_listed_and_has_help(self):
        listed = dict(api_conf.list_opts())
        self.assertEqual({'ft_api', 'nova'}, set(listed))
        self.assertEqual([], [o.dest for o in listed['ft_api']
                              if not o.help])
        nova = {o.dest for o in listed['nova']}
        self.assertTrue({'auth_url', 'username', 'password', 'service_type',
                         'valid_interfaces', 'region_name', 'cafile'}
                        <= nova, nova)
        conf = make_conf()
        self.assertEqual('compute', conf.nova.service_type)
        self.assertEqual(50, conf.ft_api.max_servers)


class SampleTest(testtools.TestCase):
    """etc/mftvm's API samples are what the generators write now."""

    ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))

    def check(self, tool: list[str], generator_conf: str,
              sample: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            fresh = os.path.join(tmp, 'sample')
            subprocess.run(
                [*tool, '--config-file', generator_conf,
                 '--output-file', fresh], cwd=self.ROOT, check=True,
                capture_output=True, timeout=300)
            with open(fresh) as f:
                expected = f.read()
        with open(os.path.join(self.ROOT, sample)) as f:
            self.assertEqual(expected, f.read(),
                             f'{sample} is stale: regenerate it with '
                             f'{" ".join(tool)} --config-file '
                             f'{generator_conf}')

    def test_config_sample(self):
        self.check([sys.executable, '-m', 'oslo_config.generator'],
                   'etc/mftvm/mftvm-api-config-generator.conf',
                   'etc/mftvm/mftvm-api.conf.sample')

    def test_policy_sample(self):
        self.check([sys.executable, '-c',
                    'from oslo_policy import generator; '
                    'generator.generate_sample()'],
                   'etc/mftvm/mftvm-policy-generator.conf',
                   'etc/mftvm/policy.yaml.sample')
