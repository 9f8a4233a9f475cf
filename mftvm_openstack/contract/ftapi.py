"""What the FT API (``mftvm-api``) answers and accepts, version 1.

The API (:mod:`mftvm_openstack.api`) builds these records from Nova's
view of a server and its agents' :class:`~.status.InstanceStatus`; the
``openstack ft`` CLI plugin (:mod:`mftvm_openstack.osc`) reads them back
with the same checks, so neither side trusts the other's JSON::

    body = {'server': FTServer(id=..., name='web', ...).to_dict()}
    FTServer.from_dict(response.json()['server'])
    ServerAction.from_body({'failover': {}})     # ServerAction(...)
    ServerAction.from_body({'reboot': {}})       # ContractError: ...

Times are wall-clock seconds since the epoch (``time.time()``), or None
where unknown; durations are milliseconds.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Optional

from mftvm_openstack.contract.record import ContractError, Record, field
from mftvm_openstack.contract.spec import HOST_PATTERN
from mftvm_openstack.contract.states import State

#: the API's one version, and its microversion-free media
API_VERSION = 'v1'
#: Nova's server ids: a UUID, in any case, with or without hyphens
SERVER_ID_PATTERN = (r'[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?'
                     r'[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}')
#: Keystone's project ids (hex UUIDs without hyphens in practice; any
#: id Keystone's own backends may make)
PROJECT_ID_PATTERN = r'[A-Za-z0-9_-]{1,64}'
#: the longest reason or error a record carries
MAX_TEXT = 1024
#: the longest server name (Nova's own limit)
MAX_NAME = 255


class Protection(enum.StrEnum):
    """Whether the server's guest is protected right now, in one word."""

    #: a secondary holds a committed replica
    PROTECTED = 'protected'
    #: protection is being set up (initial sync)
    SYNCING = 'syncing'
    #: the guest runs without a replica
    UNPROTECTED = 'unprotected'
    #: the agent on the server's host could not be asked, or knows no
    #: running side of it
    UNKNOWN = 'unknown'

    @classmethod
    def of(cls, state: Optional[State]) -> Protection:
        if state is State.PROTECTED:
            return cls.PROTECTED
        if state is State.SYNCING:
            return cls.SYNCING
        if state in (State.UNPROTECTED, State.ACTIVE, State.FAILING_OVER):
            return cls.UNPROTECTED
        return cls.UNKNOWN


@dataclasses.dataclass(frozen=True)
class FTServer(Record):
    """One fault-tolerant server, as ``GET /v1/servers/{id}`` shows it."""

    id: str = field(pattern=SERVER_ID_PATTERN)
    name: str = field(max_len=MAX_NAME)
    project_id: str = field(pattern=PROJECT_ID_PATTERN)
    protection: Protection = Protection.UNKNOWN
    #: the state of the side that runs the guest (None: not known)
    state: Optional[State] = None
    primary_host: Optional[str] = field(default=None, pattern=HOST_PATTERN)
    secondary_host: Optional[str] = field(default=None,
                                          pattern=HOST_PATTERN)
    last_committed_epoch: Optional[int] = field(default=None,
                                                range=(0, 1 << 62))
    replication_lag_epochs: Optional[int] = field(default=None,
                                                  range=(0, 1 << 62))
    pause_ms_p50: Optional[float] = field(default=None, range=(0, 1e9))
    pause_ms_p99: Optional[float] = field(default=None, range=(0, 1e9))
    #: time since the secondary last acked an epoch
    ms_since_last_commit: Optional[float] = field(default=None,
                                                  range=(0, 1e15))
    #: since when the guest runs without a replica (None: it is
    #: protected, or since when is not known)
    unprotected_since: Optional[float] = field(default=None,
                                               range=(0, 1e12))
    #: why the state is what it is
    reason: str = field(default='', max_len=MAX_TEXT)
    #: what went wrong (protection failed, the agent could not be asked)
    error: str = field(default='', max_len=MAX_TEXT)
    #: when the side published the status shown
    updated: Optional[float] = field(default=None, range=(0, 1e12))


@dataclasses.dataclass(frozen=True)
class ServerList(Record):
    """``GET /v1/servers``."""

    servers: tuple[FTServer, ...] = ()


class ActionName(enum.StrEnum):
    FAILOVER = 'failover'
    REPROTECT = 'reprotect'


@dataclasses.dataclass(frozen=True)
class Reprotect(Record):
    """The body of a ``reprotect`` action: where to (default: the
    secondary it had, or one its agent chooses)."""

    secondary_host: Optional[str] = field(default=None,
                                          pattern=HOST_PATTERN,
                                          nullable=False)


@dataclasses.dataclass(frozen=True)
class Failover(Record):
    """The body of a ``failover`` action (no options yet)."""


@dataclasses.dataclass(frozen=True)
class ServerAction(Record):
    """``POST /v1/servers/{id}/action``: exactly one action, Nova's way
    (``{"failover": {}}`` or ``{"reprotect": {"secondary_host": "hv2"}}``).
    """

    action: ActionName
    reprotect: Optional[Reprotect] = None

    @classmethod
    def from_body(cls, body: Any) -> ServerAction:
        if not isinstance(body, dict):
            raise ContractError(f'body: must be a JSON object (got '
                                f'{type(body).__name__})')
        names = ', '.join(a.value for a in ActionName)
        if len(body) != 1:
            raise ContractError(f'body: must name exactly one action '
                                f'({names}), got {len(body)}')
        ((key, value),) = body.items()
        try:
            action = ActionName(key)
        except ValueError:
            raise ContractError(f'body: unknown action {key[:40]!r} '
                                f'(actions: {names})') from None
        if value is None:
            value = {}
        if action is ActionName.FAILOVER:
            Failover.from_dict(value, 'failover')
            return cls(action=action)
        return cls(action=action,
                   reprotect=Reprotect.from_dict(value, 'reprotect'))


@dataclasses.dataclass(frozen=True)
class ActionResult(Record):
    """What an action answers: the server as it stands after it, and for
    a failover, where the guest runs now (if the agent said)."""

    action: ActionName
    server: FTServer
    runs_on: Optional[str] = field(default=None, pattern=HOST_PATTERN)
    failover_ms: Optional[float] = field(default=None, range=(0, 1e9))


@dataclasses.dataclass(frozen=True)
class VersionLink(Record):
    rel: str = field(choices=('self', 'describedby'))
    href: str = field(max_len=2048)


@dataclasses.dataclass(frozen=True)
class Version(Record):
    """One entry of the version document at ``/``."""

    id: str = field(pattern=r'v[0-9]+(\.[0-9]+)?')
    status: str = field(choices=('CURRENT', 'SUPPORTED', 'DEPRECATED'))
    links: tuple[VersionLink, ...] = field(default=(), max_len=8)
