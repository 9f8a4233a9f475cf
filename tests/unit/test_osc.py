"""The ``openstack ft`` plugin: its commands, client and entry points.

The commands run through cliff as the ``openstack`` shell runs them
(parser, take_action, formatter), on a fake keystoneauth Adapter; the
cloud lab's tier runs the real ``openstack`` against the real API.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from importlib import metadata
from typing import Any
from unittest import mock

import testtools
from osc_lib import exceptions

from mftvm_openstack.osc import plugin
from mftvm_openstack.osc.client import FTAPIError, FTClient
from mftvm_openstack.osc.v1 import server

WEB = '0b6c1d2e-0000-4000-8000-000000000001'
WEB2 = '0b6c1d2e-0000-4000-8000-000000000002'
DB = '0b6c1d2e-0000-4000-8000-000000000003'


def ft_server(id_: str, name: str, **extra: Any) -> dict[str, Any]:
    data = {'id': id_, 'name': name, 'project_id': 'p1',
            'protection': 'protected', 'state': 'protected',
            'primary_host': 'hv1', 'secondary_host': 'hv2',
            'last_committed_epoch': 118, 'replication_lag_epochs': 2,
            'pause_ms_p50': 11.5, 'pause_ms_p99': 40.25,
            'ms_since_last_commit': 180.0, 'unprotected_since': None,
            'reason': '', 'error': '', 'updated': 1700000000.0}
    data.update(extra)
    return data


class Response:
    def __init__(self, status: int, body: Any, reason: str = '') -> None:
        self.status_code = status
        self.body = body
        self.reason = reason

    def json(self) -> Any:
        if isinstance(self.body, bytes):
            raise ValueError('not JSON')
        return self.body


class FakeAdapter:
    def __init__(self, answers: dict[tuple[str, str], Response]) -> None:
        self.answers = answers
        self.asked: list[tuple[str, str, Any]] = []

    def request(self, url: str, method: str, raise_exc: bool = True,
                json: Any = None) -> Response:
        self.asked.append((method, url, json))
        return self.answers.get((method, url), Response(
            404, {'error': {'code': 404, 'message': f'no resource {url}'}}))


LISTING = Response(200, {'servers': [
    ft_server(WEB, 'web'),
    ft_server(DB, 'db', protection='unprotected', state='unprotected',
              secondary_host=None, unprotected_since=1699990000.0,
              reason='secondary lost'),
]})


class CommandTest(testtools.TestCase):

    def setUp(self) -> None:
        super().setUp()
        self.adapter = FakeAdapter({('GET', '/v1/servers'): LISTING})
        self.app = mock.Mock()
        self.app.client_manager.ft = FTClient(self.adapter)

    def run_command(self, cls: Any, *argv: str) -> str:
        self.app.stdout = io.StringIO()
        cmd = cls(self.app, None)
        parsed = cmd.get_parser('openstack ft server').parse_args(argv)
        self.assertEqual(0, cmd.run(parsed))
        return self.app.stdout.getvalue()

    def test_list_as_json_with_chosen_columns(self):
        out = json.loads(self.run_command(
            server.ListServer, '-f', 'json', '-c', 'Name', '-c',
            'Protection', '-c', 'Unprotected Since'))
        self.assertEqual([
            {'Name': 'web', 'Protection': 'protected',
             'Unprotected Since': None},
            {'Name': 'db', 'Protection': 'unprotected',
             'Unprotected Since': 1699990000.0}], out)

    def test_list_as_a_table_shows_times_in_utc(self):
        out = self.run_command(server.ListServer, '--long')
        self.assertIn('2023-11-14T19:26:40+00:00', out)
        self.assertIn('secondary lost', out)
        self.assertIn('Pause p99 (ms)', out)

    def test_list_asks_for_what_the_options_say(self):
        self.adapter.answers[
            ('GET', '/v1/servers?all_projects=true&limit=5')] = LISTING
        self.adapter.answers[('GET', '/v1/servers?project_id=p2')] = LISTING
        self.run_command(server.ListServer, '--all-projects', '--limit',
                         '5')
        self.run_command(server.ListServer, '--project', 'p2')
        self.assertEqual(['/v1/servers?all_projects=true&limit=5',
                          '/v1/servers?project_id=p2'],
                         [url for _, url, _ in self.adapter.asked])

    def test_show_by_name_or_id(self):
        self.adapter.answers[('GET', f'/v1/servers/{DB}')] = Response(
            200, {'server': LISTING.body['servers'][1]})
        by_name = json.loads(self.run_command(server.ShowServer, 'db',
                                              '-f', 'json'))
        by_id = json.loads(self.run_command(server.ShowServer, DB,
                                            '-f', 'json'))
        self.assertEqual(by_name, by_id)
        self.assertEqual(('unprotected', 1699990000.0, None),
                         (by_name['protection'],
                          by_name['unprotected_since'],
                          by_name['secondary_host']))
        value = self.run_command(server.ShowServer, DB, '-f', 'value',
                                 '-c', 'state')
        self.assertEqual('unprotected\n', value)

    def test_a_name_must_name_one_server(self):
        self.adapter.answers[('GET', '/v1/servers')] = Response(
            200, {'servers': [ft_server(WEB, 'web'),
                              ft_server(WEB2, 'web')]})
        exc = self.assertRaises(exceptions.CommandError, self.run_command,
                                server.ShowServer, 'web')
        self.assertEqual(f'More than one FT server is named \'web\': give '
                         f'its ID ({WEB}, {WEB2}).', str(exc))
        exc = self.assertRaises(exceptions.CommandError, self.run_command,
                                server.ShowServer, 'nope')
        self.assertEqual('No FT server with a name or ID of \'nope\' '
                         'exists.', str(exc))

    def test_the_apis_refusal_is_the_commands_error(self):
        self.adapter.answers[('POST', f'/v1/servers/{WEB}/action')] = \
            Response(403, {'error': {'code': 403, 'title': 'Forbidden',
                                     'message': 'failover is not allowed'}})
        exc = self.assertRaises(exceptions.CommandError, self.run_command,
                                server.FailoverServer, 'web')
        self.assertEqual('failover is not allowed (HTTP 403)', str(exc))
        self.assertEqual(('POST', f'/v1/servers/{WEB}/action',
                          {'failover': {}}), self.adapter.asked[-1])

    def test_failover_and_reprotect_show_the_result(self):
        self.adapter.answers[('POST', f'/v1/servers/{WEB}/action')] = \
            Response(200, {'action': 'failover', 'runs_on': 'hv2',
                           'failover_ms': None,
                           'server': ft_server(WEB, 'web')})
        out = json.loads(self.run_command(server.FailoverServer, WEB,
                                          '-f', 'json'))
        self.assertEqual(('failover', 'hv2', 'protected'),
                         (out['action'], out['runs_on'], out['protection']))
        self.adapter.answers[('POST', f'/v1/servers/{DB}/action')] = \
            Response(200, {'action': 'reprotect',
                           'server': ft_server(DB, 'db')})
        self.run_command(server.ReprotectServer, DB, '--secondary-host',
                         'hv3')
        self.assertEqual(('POST', f'/v1/servers/{DB}/action',
                          {'reprotect': {'secondary_host': 'hv3'}}),
                         self.adapter.asked[-1])
        exc = self.assertRaises(exceptions.CommandError, self.run_command,
                                server.ReprotectServer, DB,
                                '--secondary-host', 'a b')
        self.assertEqual('--secondary-host \'a b\': not a host name',
                         str(exc))


class ClientTest(testtools.TestCase):

    def test_answers_are_checked(self):
        cases = [
            (Response(200, {'servers': [ft_server(WEB, 'web',
                                                  protection='great')]}),
             'the FT API answered what this client cannot read: '
             'servers[0].protection: must be one of'),
            (Response(200, b'<html>'), 'the FT API answered GET /servers '
                                       'with what is not a JSON object'),
            (Response(502, b'<html>', reason='Bad Gateway'),
             'Bad Gateway (HTTP 502)'),
        ]
        for response, message in cases:
            client = FTClient(FakeAdapter({('GET', '/v1/servers'):
                                           response}))
            exc = self.assertRaises(FTAPIError, client.list_servers)
            self.assertTrue(str(exc).startswith(message), str(exc))

    def test_make_client_finds_the_api_in_the_catalog(self):
        instance = mock.Mock(_api_version={'ft': '1'}, interface='public',
                             region_name='RegionOne')
        client = plugin.make_client(instance)
        self.assertEqual(('fault-tolerance', 'public', 'RegionOne'),
                         (client.adapter.service_type,
                          client.adapter.interface,
                          client.adapter.region_name))
        self.assertIs(instance.session, client.adapter.session)
        instance._api_version = {'ft': '2'}
        self.assertRaises(exceptions.UnsupportedVersion,
                          plugin.make_client, instance)

    def test_entry_points(self):
        ext = {ep.name: ep.value for ep in
               metadata.entry_points(group='openstack.cli.extension')}
        self.assertEqual('mftvm_openstack.osc.plugin', ext['ft'])
        commands = {ep.name: ep.load() for ep in
                    metadata.entry_points(group='openstack.ft.v1')}
        self.assertEqual({'ft_server_list': server.ListServer,
                          'ft_server_show': server.ShowServer,
                          'ft_server_failover': server.FailoverServer,
                          'ft_server_reprotect': server.ReprotectServer},
                         commands)

    def test_the_plugin_stays_light(self):
        # the openstack CLI loads every plugin on start
        code = ('import sys; import mftvm_openstack.osc.plugin, '
                'mftvm_openstack.osc.v1.server; '
                'print(sorted(m for m in sys.modules if m.startswith(('
                '"oslo_messaging", "numpy", "mftvm_openstack.agent", '
                '"mftvm_openstack.ft"))))')
        out = subprocess.run([sys.executable, '-c', code], check=True,
                             capture_output=True, text=True).stdout
        self.assertEqual('[]', out.strip())


