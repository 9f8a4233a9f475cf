"""``openstack ft server list|show|failover|reprotect``.

SERVER is a server's id or its name (names are looked up among the FT
servers the caller may list, and must be unique there)::

    $ openstack ft server list -c Name -c Protection -f json
    [{"Name": "web", "Protection": "protected"}]
    $ openstack ft server show web -f value -c state
    protected

Times are shown in UTC (ISO 8601); ``-f json`` and ``-f yaml`` give them
as seconds since the epoch, as the API does.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import re
from typing import Any, Optional, cast

from cliff import columns
from osc_lib import exceptions
from osc_lib.command import command

from mftvm_openstack.contract.ftapi import (
    SERVER_ID_PATTERN,
    ActionResult,
    FTServer,
)
from mftvm_openstack.contract.spec import HOST_PATTERN
from mftvm_openstack.osc.client import FTAPIError, FTClient
from mftvm_openstack.osc.plugin import API_NAME

LOG = logging.getLogger(__name__)

_ID_RE = re.compile(SERVER_ID_PATTERN)
_HOST_RE = re.compile(HOST_PATTERN)

#: (attribute, column heading) of a listing; the long listing adds LONG
COLUMNS = (
    ('id', 'ID'),
    ('name', 'Name'),
    ('protection', 'Protection'),
    ('state', 'State'),
    ('primary_host', 'Primary Host'),
    ('secondary_host', 'Secondary Host'),
    ('last_committed_epoch', 'Last Committed Epoch'),
    ('unprotected_since', 'Unprotected Since'),
)
LONG = (
    ('project_id', 'Project'),
    ('replication_lag_epochs', 'Replication Lag'),
    ('pause_ms_p50', 'Pause p50 (ms)'),
    ('pause_ms_p99', 'Pause p99 (ms)'),
    ('ms_since_last_commit', 'Since Last Commit (ms)'),
    ('reason', 'Reason'),
    ('error', 'Error'),
)
#: fields shown as times
TIMES = ('unprotected_since', 'updated')


class TimeColumn(columns.FormattableColumn):  # type: ignore[misc]
    """Seconds since the epoch: ISO 8601 in UTC for people, the number
    for machines."""

    def human_readable(self) -> str:
        if self._value is None:
            return ''
        return datetime.datetime.fromtimestamp(
            self._value, datetime.UTC).isoformat(
            timespec='seconds')

    def machine_readable(self) -> Optional[float]:
        return self._value  # type: ignore[no-any-return]


def _value(server: FTServer, attr: str) -> Any:
    value = getattr(server, attr)
    if attr in TIMES:
        return TimeColumn(value)
    if hasattr(value, 'value'):         # an enum: its spelling
        return value.value
    return value


def _show(server: FTServer, extra: dict[str, Any] | None = None
          ) -> tuple[tuple[str, ...], tuple[Any, ...]]:
    data = {name: _value(server, name)
            for name in FTServer.__dataclass_fields__}
    data.update(extra or {})
    names = tuple(sorted(data))
    return names, tuple(data[n] for n in names)


def _client(app: Any) -> FTClient:
    # OSC's ClientManager makes the attribute on first use (make_client)
    return cast(FTClient, getattr(app.client_manager, API_NAME))


def _call(func: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return func(*args, **kwargs)
    except FTAPIError as exc:
        raise exceptions.CommandError(str(exc)) from None


def find_server(client: Any, name_or_id: str) -> str:
    """The id of the FT server ``name_or_id`` names (an id is taken as
    it is: the API answers 404 for one it does not know)."""
    if _ID_RE.fullmatch(name_or_id):
        return name_or_id
    matches = [s for s in _call(client.list_servers)
               if s.name == name_or_id]
    if not matches:
        raise exceptions.CommandError(
            f'No FT server with a name or ID of {name_or_id!r} exists.')
    if len(matches) > 1:
        raise exceptions.CommandError(
            f'More than one FT server is named {name_or_id!r}: give its '
            f'ID ({", ".join(s.id for s in matches)}).')
    return matches[0].id


class ListServer(command.Lister):  # type: ignore[misc]
    """List fault-tolerant servers and whether they are protected now"""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        which = parser.add_mutually_exclusive_group()
        which.add_argument(
            '--all-projects', action='store_true', default=False,
            help='List the FT servers of every project (admin only)')
        which.add_argument(
            '--project', metavar='<project-id>',
            help='List the FT servers of this project (admin only)')
        parser.add_argument(
            '--limit', metavar='<num-servers>', type=int,
            help='Show at most this many servers')
        parser.add_argument(
            '--long', action='store_true', default=False,
            help='List more fields: project, replication lag, pauses, '
                 'time since the last commit, reason and error')
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> Any:
        client = _client(self.app)
        fields = COLUMNS + (LONG if parsed_args.long else ())
        servers = _call(client.list_servers,
                        all_projects=parsed_args.all_projects,
                        project_id=parsed_args.project,
                        limit=parsed_args.limit)
        return (tuple(heading for _, heading in fields),
                (tuple(_value(s, attr) for attr, _ in fields)
                 for s in servers))


class ShowServer(command.ShowOne):  # type: ignore[misc]
    """Show a fault-tolerant server's live protection state"""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument('server', metavar='<server>',
                            help='Server (name or ID)')
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> Any:
        client = _client(self.app)
        server_id = find_server(client, parsed_args.server)
        return _show(_call(client.get_server, server_id))


def _result(result: ActionResult) -> Any:
    return _show(result.server, {'action': result.action.value,
                                 'runs_on': result.runs_on,
                                 'failover_ms': result.failover_ms})


class FailoverServer(command.ShowOne):  # type: ignore[misc]
    """Fail a protected server over to its secondary now (admin only)"""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument('server', metavar='<server>',
                            help='Server to fail over (name or ID)')
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> Any:
        client = _client(self.app)
        server_id = find_server(client, parsed_args.server)
        return _result(_call(client.action, server_id, {'failover': {}}))


class ReprotectServer(command.ShowOne):  # type: ignore[misc]
    """Protect a server that runs unprotected again (admin only)"""

    def get_parser(self, prog_name: str) -> argparse.ArgumentParser:
        parser = super().get_parser(prog_name)
        parser.add_argument('server', metavar='<server>',
                            help='Server to re-protect (name or ID)')
        parser.add_argument(
            '--secondary-host', metavar='<host>',
            help='Compute host to hold the new secondary (default: the '
                 'one the agent chooses)')
        return parser

    def take_action(self, parsed_args: argparse.Namespace) -> Any:
        client = _client(self.app)
        body: dict[str, Any] = {}
        host = parsed_args.secondary_host
        if host is not None:
            if not _HOST_RE.fullmatch(host):
                raise exceptions.CommandError(
                    f'--secondary-host {host!r}: not a host name')
            body['secondary_host'] = host
        server_id = find_server(client, parsed_args.server)
        return _result(_call(client.action, server_id,
                             {'reprotect': body}))
