"""The FT API's answers, from Nova's inventory and the agents' status.

A server's live state is what the agent on its Nova host says of it
(:class:`~mftvm_openstack.contract.status.InstanceStatus`), turned into
the API's record (:class:`~mftvm_openstack.contract.ftapi.FTServer`)::

    ft = FTService(inventory, agents, agent_timeout=10)
    ft.list(project_id='4f1...', limit=100)    # [FTServer, ...]
    ft.show('0b6c...')                         # FTServer
    ft.failover(ft.lookup('0b6c...'))          # ActionResult

A server is shown when its flavor or metadata asks for FT, or when the
agent on its host runs a side of it. An agent that cannot be asked makes
its servers' protection ``unknown`` (with the reason in ``error``), not
the whole list fail. Errors are :class:`APIError` with the HTTP status
they answer.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Protocol

from mftvm_openstack.agent import exception as agent_exc
from mftvm_openstack.api.inventory import (
    Inventory,
    InventoryError,
    NovaServer,
)
from mftvm_openstack.contract.ftapi import (
    MAX_TEXT,
    ActionName,
    ActionResult,
    FTServer,
    Protection,
    ServerAction,
)
from mftvm_openstack.contract.limits import MEMORY_MIB_RANGE, SMP_RANGE
from mftvm_openstack.contract.record import ContractError
from mftvm_openstack.contract.spec import (
    FailoverResult,
    GuestSpec,
    ProtectionOptions,
)
from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import InstanceStatus

LOG = logging.getLogger(__name__)

#: the states in which a primary's guest runs without a replica, so a
#: reprotect may start (the agent's own rule)
REPROTECTABLE = frozenset({State.UNPROTECTED, State.ACTIVE})


class APIError(Exception):
    """An answer other than 200: ``status`` and a one-line message."""

    status = 500
    title = 'Internal Server Error'

    def __init__(self, message: str) -> None:
        super().__init__(_clip(message))


class BadRequest(APIError):
    status, title = 400, 'Bad Request'


class Forbidden(APIError):
    status, title = 403, 'Forbidden'


class NotFound(APIError):
    status, title = 404, 'Not Found'


class Conflict(APIError):
    status, title = 409, 'Conflict'


class BadGateway(APIError):
    """Nova or an agent answered what the API cannot use."""

    status, title = 502, 'Bad Gateway'


class Unavailable(APIError):
    """Nova or an agent did not answer."""

    status, title = 503, 'Service Unavailable'


def _clip(text: str) -> str:
    line = ' '.join(str(text).split())
    return line if len(line) <= MAX_TEXT else line[:MAX_TEXT - 3] + '...'


class Agents(Protocol):
    """What the API needs of the agents (AgentAPI; faked in tests)."""

    def list(self, ctxt: Any, host: str) -> list[dict[str, Any]]: ...

    def status(self, ctxt: Any, host: str,
               instance: str) -> dict[str, Any]: ...

    def failover(self, ctxt: Any, host: str,
                 instance: str) -> dict[str, Any]: ...

    def protect(self, ctxt: Any, host: str, instance: str,
                spec: GuestSpec, options: ProtectionOptions,
                secondary_host: Optional[str] = None) -> dict[str, Any]: ...


def view(server: NovaServer, status: Optional[InstanceStatus],
         error: str = '') -> FTServer:
    """The API's record of ``server`` with what its agent said
    (``status``; None: no side of it runs there, or, with ``error``, the
    agent could not be asked)."""
    base = dict(id=server.id, name=server.name,
                project_id=server.project_id, primary_host=server.host)
    if error:
        return FTServer(protection=Protection.UNKNOWN, error=_clip(error),
                        **base)  # type: ignore[arg-type]
    if status is None:
        return FTServer(
            protection=Protection.UNPROTECTED,
            reason='no FT agent runs a side of it on its host',
            **base)  # type: ignore[arg-type]
    if status.alive is False:
        protection = Protection.UNKNOWN
        reason = f'its {status.role} instance process has ended ' \
                 f'({status.state})'
    else:
        # protected from the first committed epoch on, as the agents'
        # notifications and Nova's ft_status count it
        protection = Protection.of(status.counted_state)
        reason = status.reason
    primary, secondary = server.host, status.peer
    if status.role is Role.SECONDARY:
        # Nova still names the host this side stands by for
        primary, secondary = status.peer, status.host or server.host
    return FTServer(
        id=server.id, name=server.name, project_id=server.project_id,
        protection=protection, state=status.state,
        primary_host=primary or None, secondary_host=secondary or None,
        last_committed_epoch=status.last_committed_epoch,
        replication_lag_epochs=max(0, status.replication_lag_epochs),
        pause_ms_p50=status.pause_ms_p50, pause_ms_p99=status.pause_ms_p99,
        ms_since_last_commit=status.ms_since_last_ack,
        unprotected_since=status.state_since
        if protection is Protection.UNPROTECTED else None,
        reason=_clip(reason), error=_clip(status.error),
        updated=status.updated or None)


def _clamp(value: int, bounds: tuple[int, int]) -> int:
    return min(max(value, bounds[0]), bounds[1])


def _agent_error(host: str, exc: BaseException) -> str:
    return f'the agent on {host} could not be asked: {exc}'


class FTService:
    """The API's operations, on an :class:`Inventory` and the agents."""

    def __init__(self, inventory: Inventory, agents: Agents,
                 action_agents: Optional[Agents] = None,
                 max_hosts: int = 200) -> None:
        self.inventory = inventory
        self.agents = agents
        #: the same agents, with the (longer) timeout of actions
        self.action_agents = action_agents or agents
        self.max_hosts = max_hosts

    # -- reading --

    def _nova(self, call: Any, *args: Any) -> Any:
        try:
            return call(*args)
        except InventoryError as exc:
            LOG.warning('Nova: %s', exc)
            raise Unavailable(f'Nova: {exc}') from None

    def lookup(self, server_id: str) -> NovaServer:
        """The server as Nova knows it; NotFound if it does not."""
        server = self._nova(self.inventory.server, server_id)
        if server is None:
            raise NotFound(f'no server {server_id}')
        return server

    def _host_statuses(self, host: str) -> dict[str, InstanceStatus]:
        """What the agent on ``host`` runs, by instance (raises the
        agent's errors)."""
        entries = self.agents.list({}, host)
        if not isinstance(entries, list):
            raise agent_exc.MftvmError('its list is not a list')
        out = {}
        for entry in entries:
            try:
                st = InstanceStatus.from_dict(entry, 'status')
            except ContractError as exc:
                LOG.warning('Agent on %s: unreadable status: %s', host, exc)
                continue
            out[st.instance] = st
        return out

    def list(self, project_id: Optional[str], limit: int) -> list[FTServer]:
        """The FT servers of ``project_id`` (None: of every project)."""
        servers = self._nova(self.inventory.servers, project_id, limit)
        by_host: dict[str, list[NovaServer]] = {}
        for server in servers:
            if server.host:
                by_host.setdefault(server.host, []).append(server)
        statuses: dict[str, dict[str, InstanceStatus]] = {}
        errors: dict[str, str] = {}
        for i, host in enumerate(sorted(by_host)):
            if i >= self.max_hosts:
                errors[host] = (f'not asked: more than {self.max_hosts} '
                                f'hosts ([ft_api] max_hosts)')
                continue
            try:
                statuses[host] = self._host_statuses(host)
            except agent_exc.MftvmError as exc:
                errors[host] = _agent_error(host, exc)
        out = []
        for server in servers:
            host = server.host or ''
            status = statuses.get(host, {}).get(server.id)
            if status is None and not server.ft_requested:
                continue              # not an FT server
            out.append(view(server, status, errors.get(host, '')
                            if status is None else ''))
        return out

    def status_of(self, server: NovaServer) -> tuple[
            Optional[InstanceStatus], str]:
        """What the agent on the server's host says of it, or why it
        could not be asked."""
        if not server.host:
            return None, ''
        try:
            data = self.agents.status({}, server.host, server.id)
        except agent_exc.InstanceNotFound:
            return None, ''
        except agent_exc.MftvmError as exc:
            return None, _agent_error(server.host, exc)
        try:
            return InstanceStatus.from_dict(data, 'status'), ''
        except ContractError as exc:
            return None, (f'the agent on {server.host} answered a status '
                          f'this API cannot read: {exc}')

    def show(self, server: NovaServer) -> FTServer:
        status, error = self.status_of(server)
        if status is None and not error and not server.ft_requested:
            raise NotFound(f'server {server.id} is not fault tolerant')
        return view(server, status, error)

    # -- actions --

    def act(self, server: NovaServer, action: ServerAction) -> ActionResult:
        status, error = self.status_of(server)
        if status is None:
            raise Conflict(error or f'server {server.id} has no FT side '
                           f'on its host {server.host or "(none)"}')
        if action.action is ActionName.FAILOVER:
            return self._failover(server, status)
        return self._reprotect(server, status, action)

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.action_agents, method)({}, *args, **kwargs)
        except agent_exc.PeerUnreachable as exc:
            raise Unavailable(str(exc)) from None
        except (agent_exc.Conflict, agent_exc.InstanceNotFound,
                agent_exc.InsufficientCapacity) as exc:
            raise Conflict(str(exc)) from None
        except agent_exc.MftvmError as exc:
            raise BadGateway(str(exc)) from None

    def _failover(self, server: NovaServer,
                  status: InstanceStatus) -> ActionResult:
        if status.role is not Role.PRIMARY or \
                status.state is not State.PROTECTED:
            raise Conflict(f'server {server.id} is {status.state} on '
                           f'{server.host}: only a protected server can '
                           f'fail over')
        reply = self._call('failover', server.host, server.id)
        try:
            result = FailoverResult.from_dict(reply, 'failover')
        except ContractError as exc:
            raise BadGateway(f'the agent on {server.host} answered a '
                             f'failover this API cannot read: {exc}') \
                from None
        return ActionResult(action=ActionName.FAILOVER,
                            server=self.show(server),
                            runs_on=result.runs_on,
                            failover_ms=result.failover_ms)

    def _reprotect(self, server: NovaServer, status: InstanceStatus,
                   action: ServerAction) -> ActionResult:
        if status.role is not Role.PRIMARY or \
                status.state not in REPROTECTABLE:
            raise Conflict(f'server {server.id} is {status.state} on '
                           f'{server.host}: only a server that runs '
                           f'unprotected can be re-protected')
        wanted = action.reprotect.secondary_host if action.reprotect \
            else None
        if wanted is not None and wanted == server.host:
            raise BadRequest(f'reprotect.secondary_host: must not be the '
                             f'server\'s own host ({wanted})')
        # The agent re-protects the guest it runs and reads its spec
        # from there; this one only has to pass the RPC's checks.
        spec = GuestSpec(name=server.id, domain=server.instance_name,
                         memory_mib=_clamp(server.memory_mib,
                                           MEMORY_MIB_RANGE),
                         smp=_clamp(server.vcpus, SMP_RANGE))
        self._call('protect', server.host, server.id, spec,
                   ProtectionOptions(), secondary_host=wanted)
        return ActionResult(action=ActionName.REPROTECT,
                            server=self.show(server))

