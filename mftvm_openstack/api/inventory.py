"""Which servers a project has, and where they run: asked of Nova.

The FT API learns a server's project, host and libvirt domain from Nova,
as the ``[nova]`` service user (an admin): a tenant's own token would not
show the host (``OS-EXT-SRV-ATTR:host`` is admin-only in Nova's default
policy), and the agent to ask is the one on that host. Which project the
caller may see is decided by the API's policy, from the caller's token,
never from what the caller asks for::

    nova = NovaInventory(adapter)          # a keystoneauth1 Adapter
    nova.servers(project_id='4f1...', limit=100)   # [NovaServer, ...]
    nova.server('0b6c...')                 # NovaServer, or None

Nova's JSON is read into :class:`NovaServer` records, checked like any
other input that crosses a process.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Protocol
from urllib import parse

from mftvm_openstack.contract.ftapi import (
    MAX_NAME,
    PROJECT_ID_PATTERN,
    SERVER_ID_PATTERN,
)
from mftvm_openstack.contract.record import ContractError, Record, field
from mftvm_openstack.contract.spec import HOST_PATTERN, NAME_PATTERN
from mftvm_openstack.nova import ft_request

#: the microversion whose server embeds its flavor with extra specs
MICROVERSION = '2.47'
#: Nova pages its lists; at most this many pages are followed
MAX_PAGES = 100


class InventoryError(Exception):
    """Nova could not be asked, or answered what cannot be read."""


@dataclasses.dataclass(frozen=True)
class NovaServer(Record):
    """What the API needs to know of a Nova server."""

    id: str = field(pattern=SERVER_ID_PATTERN)
    name: str = field(max_len=MAX_NAME)
    project_id: str = field(pattern=PROJECT_ID_PATTERN)
    #: the compute host that runs it (None: not scheduled, or shelved)
    host: Optional[str] = field(default=None, pattern=HOST_PATTERN)
    #: its libvirt domain (``instance-0000000a``)
    instance_name: str = field(default='', pattern=f'({NAME_PATTERN})?')
    memory_mib: int = field(default=0, range=(0, 1 << 30))
    vcpus: int = field(default=0, range=(0, 1 << 16))
    #: the flavor or the server's metadata asks for FT (a bad request
    #: counts as asking, as the compute driver counts it)
    ft_requested: bool = False

    @classmethod
    def from_nova(cls, data: Any) -> NovaServer:
        if not isinstance(data, dict):
            raise ContractError('server: must be a JSON object')
        flavor = data.get('flavor') or {}
        if not isinstance(flavor, dict):
            raise ContractError('server.flavor: must be a JSON object')
        try:
            requested = ft_request.get_ft_request(
                _str_map(flavor.get('extra_specs')),
                _str_map(data.get('metadata'))).enabled
        except ft_request.InvalidFTRequest:
            requested = True
        return cls.from_dict({
            'id': data.get('id'), 'name': data.get('name'),
            'project_id': data.get('tenant_id'),
            'host': data.get('OS-EXT-SRV-ATTR:host') or None,
            'instance_name': data.get('OS-EXT-SRV-ATTR:instance_name')
            or '',
            'memory_mib': flavor.get('ram', 0),
            'vcpus': flavor.get('vcpus', 0),
            'ft_requested': requested}, 'server')


def _str_map(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


class Inventory(Protocol):
    """What the API needs of Nova (faked in the unit tests)."""

    def servers(self, project_id: Optional[str],
                limit: int) -> list[NovaServer]: ...

    def server(self, server_id: str) -> Optional[NovaServer]: ...


class NovaInventory:
    """:class:`Inventory` on Nova's API, through a keystoneauth Adapter
    authenticated as the service user."""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter

    def _get(self, url: str) -> Any:
        try:
            resp = self.adapter.get(url, microversion=MICROVERSION,
                                    raise_exc=False)
        except Exception as exc:   # keystoneauth's connection errors
            raise InventoryError(f'cannot reach Nova: '
                                 f'{type(exc).__name__}: {exc}') from None
        if resp.status_code == 404:
            return None
        if resp.status_code != 200:
            raise InventoryError(f'Nova answered {resp.status_code} to '
                                 f'GET {url.split("?")[0]}')
        try:
            return resp.json()
        except ValueError:
            raise InventoryError('Nova answered what is not JSON') \
                from None

    def servers(self, project_id: Optional[str],
                limit: int) -> list[NovaServer]:
        """The servers of ``project_id`` (None: of every project)."""
        query = {'all_tenants': '1', 'limit': str(limit)}
        if project_id is not None:
            query['project_id'] = project_id
        url: Optional[str] = '/servers/detail?' + parse.urlencode(query)
        out: list[NovaServer] = []
        for _ in range(MAX_PAGES):
            if url is None:
                break
            body = self._get(url)
            if not isinstance(body, dict) or \
                    not isinstance(body.get('servers'), list):
                raise InventoryError('Nova\'s server list has no servers')
            for item in body['servers']:
                out.append(self._read(item))
                if len(out) >= limit:
                    return out
            url = _next(body)
        return out

    def server(self, server_id: str) -> Optional[NovaServer]:
        body = self._get(f'/servers/{parse.quote(server_id)}')
        if body is None:
            return None
        if not isinstance(body, dict):
            raise InventoryError('Nova\'s server is not a JSON object')
        return self._read(body.get('server'))

    @staticmethod
    def _read(item: Any) -> NovaServer:
        try:
            return NovaServer.from_nova(item)
        except ContractError as exc:
            raise InventoryError(f'Nova answered a server this API cannot '
                                 f'read: {exc}') from None


def _next(body: dict[str, Any]) -> Optional[str]:
    """The path and query of Nova's next page, if any."""
    for link in body.get('servers_links') or ():
        if isinstance(link, dict) and link.get('rel') == 'next' and \
                isinstance(link.get('href'), str):
            url = parse.urlsplit(link['href'])
            # relative to the adapter's endpoint, which ends in /v2.1
            path = url.path.split('/servers/', 1)[-1]
            return f'/servers/{path}?{url.query}'
    return None
