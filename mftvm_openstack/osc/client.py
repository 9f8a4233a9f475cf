"""A client of the FT API, on a keystoneauth1 Adapter.

Every answer is read into the contract's records (checked like any
input), every error into one line::

    client = FTClient(adapter)           # service_type 'fault-tolerance'
    client.list_servers(all_projects=True)   # (FTServer, ...)
    client.get_server('0b6c...')         # FTServer
    client.action('0b6c...', {'failover': {}})   # ActionResult

An error answer raises :class:`FTAPIError` with the API's message and
its HTTP status (``.status``).
"""

from __future__ import annotations

from typing import Any, Optional
from urllib import parse

from mftvm_openstack.contract.ftapi import (
    API_VERSION,
    ActionResult,
    FTServer,
    ServerList,
)
from mftvm_openstack.contract.record import ContractError

#: the FT API's service type in the Keystone catalog
SERVICE_TYPE = 'fault-tolerance'


class FTAPIError(Exception):
    """The FT API refused a request, or answered what cannot be read."""

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status


class FTClient:

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.adapter.request(f'/{API_VERSION}{path}', method,
                                    raise_exc=False, **kwargs)
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code >= 400:
            message = None
            if isinstance(body, dict) and isinstance(body.get('error'),
                                                     dict):
                message = body['error'].get('message')
            raise FTAPIError(f'{message or resp.reason or "error"} '
                             f'(HTTP {resp.status_code})',
                             resp.status_code)
        if not isinstance(body, dict):
            raise FTAPIError(f'the FT API answered {method} {path} with '
                             f'what is not a JSON object')
        return body

    def list_servers(self, all_projects: bool = False,
                     project_id: Optional[str] = None,
                     limit: Optional[int] = None) -> tuple[FTServer, ...]:
        query: dict[str, str] = {}
        if all_projects:
            query['all_projects'] = 'true'
        if project_id is not None:
            query['project_id'] = project_id
        if limit is not None:
            query['limit'] = str(limit)
        path = '/servers' + (f'?{parse.urlencode(query)}' if query else '')
        return _read(ServerList, self._request('GET', path)).servers

    def get_server(self, server_id: str) -> FTServer:
        body = self._request('GET', f'/servers/{parse.quote(server_id)}')
        return _read(FTServer, body.get('server'))

    def action(self, server_id: str, body: dict[str, Any]) -> ActionResult:
        return _read(ActionResult, self._request(
            'POST', f'/servers/{parse.quote(server_id)}/action', json=body))


def _read(cls: Any, data: Any) -> Any:
    try:
        return cls.from_dict(data)
    except ContractError as exc:
        raise FTAPIError(f'the FT API answered what this client cannot '
                         f'read: {exc}') from None
