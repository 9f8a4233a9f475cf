"""The agents' versioned notifications: event types and payloads.

An agent tells the notification bus (oslo.messaging) when the protection
of a guest changes, in the shape of Nova's versioned notifications: an
``event_type``, a priority, ``publisher_id`` ``mftvm-agent:<host>`` and a
payload that names its own type and version, so a consumer can check what
it reads::

    payload = InstanceFTPayload(instance='4f1c...', state=State.UNPROTECTED,
                                role=Role.PRIMARY, host='hv1',
                                primary_host='hv1', secondary_host='hv2',
                                last_committed_epoch=812,
                                reason='data stream: connection reset')
    body = versioned(payload)
    # {'mftvm_object.name': 'InstanceFTPayload',
    #  'mftvm_object.namespace': 'mftvm',
    #  'mftvm_object.version': '1.0',
    #  'mftvm_object.data': {'instance': '4f1c...', ...}}
    InstanceFTPayload.from_versioned(body) == payload      # True
    Event.SECONDARY_LOST.event_type     # 'mftvm.instance.secondary_lost'
    Event.SECONDARY_LOST.priority       # Priority.ERROR

The payloads are :class:`~.record.Record` s rather than
oslo.versionedobjects: the contract stays stdlib-only (nova-api and the
instance process import it), and a consumer checks a payload with the same
``from_dict`` that checks every other record (unknown fields and wrong
types refused, where a versioned object coerces). The wire shape is the
one a consumer of Nova's notifications already reads. Versions follow
oslo.versionedobjects' rule: a minor version adds optional fields, so
:meth:`InstanceFTPayload.from_versioned` reads any ``1.x``, keeping the
fields it knows; a new major version is refused.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, ClassVar, Optional, TypeVar

from mftvm_openstack.contract.record import ContractError, Record
from mftvm_openstack.contract.states import Role, State

#: the prefix of the envelope's keys and the payloads' namespace
NAMESPACE = 'mftvm'
_KEY = f'{NAMESPACE}_object'

P = TypeVar('P', bound='VersionedPayload')


class Priority(enum.StrEnum):
    """oslo.messaging's priorities that the agents use."""

    INFO = 'info'
    ERROR = 'error'


class Event(enum.Enum):
    """What happened, as (``event_type``, priority)."""

    #: a guest was protected (its first epoch committed) on request
    PROTECT_END = ('mftvm.instance.protect.end', Priority.INFO)
    #: protecting it failed: it runs on unprotected
    PROTECT_ERROR = ('mftvm.instance.protect.error', Priority.ERROR)
    #: an operator ended its protection
    UNPROTECT_END = ('mftvm.instance.unprotect.end', Priority.INFO)
    #: its secondary was lost: it runs on unprotected
    SECONDARY_LOST = ('mftvm.instance.secondary_lost', Priority.ERROR)
    #: its secondary starts to take over (the primary is lost, or a
    #: failover was asked for)
    FAILOVER_START = ('mftvm.instance.failover.start', Priority.INFO)
    #: the secondary runs the guest now (unprotected until re-protected)
    FAILOVER_END = ('mftvm.instance.failover.end', Priority.INFO)
    #: the secondary could not take over
    FAILOVER_ERROR = ('mftvm.instance.failover.error', Priority.ERROR)
    #: protected again, after a secondary loss or a failover
    REPROTECT_END = ('mftvm.instance.reprotect.end', Priority.INFO)

    @property
    def event_type(self) -> str:
        return str(self.value[0])

    @property
    def priority(self) -> Priority:
        return Priority(self.value[1])


class VersionedPayload(Record):
    """A record that travels in the versioned envelope."""

    #: MAJOR.MINOR: a minor version only adds optional fields
    VERSION: ClassVar[str] = '1.0'

    @classmethod
    def from_versioned(cls: type[P], body: Any, where: str = 'payload') -> P:
        """The payload of ``body``, checked: its name, namespace and major
        version must be this class', its data this record's."""
        if not isinstance(body, dict):
            raise ContractError(f'{where}: must be a JSON object')
        for key, want in (('name', cls.__name__), ('namespace', NAMESPACE)):
            if body.get(f'{_KEY}.{key}') != want:
                raise ContractError(f'{where}.{_KEY}.{key}: must be {want} '
                                    f'(got {body.get(f"{_KEY}.{key}")!r})')
        version = body.get(f'{_KEY}.version')
        if not isinstance(version, str) or \
                version.partition('.')[0] != cls.VERSION.partition('.')[0]:
            raise ContractError(f'{where}.{_KEY}.version: must be '
                                f'{cls.VERSION.partition(".")[0]}.x (got '
                                f'{version!r})')
        data = body.get(f'{_KEY}.data')
        if isinstance(data, dict) and version != cls.VERSION:
            # a newer minor version: its added fields are optional
            known = {f.name for f in dataclasses.fields(cls)}  # type: ignore
            data = {k: v for k, v in data.items() if k in known}
        return cls.from_dict(data, f'{where}.{_KEY}.data')


def versioned(payload: VersionedPayload) -> dict[str, Any]:
    """``payload`` in its envelope (see the module docstring)."""
    return {f'{_KEY}.name': type(payload).__name__,
            f'{_KEY}.namespace': NAMESPACE,
            f'{_KEY}.version': payload.VERSION,
            f'{_KEY}.data': payload.to_dict()}


@dataclasses.dataclass(frozen=True)
class InstanceFTPayload(VersionedPayload):
    """The protection of one guest, as the side that tells it sees it."""

    VERSION: ClassVar[str] = '1.0'

    #: the guest (under Nova, the instance uuid)
    instance: str
    #: the state of the side that tells, after the change
    state: State
    #: that side's role, and its host (the publisher's)
    role: Role
    host: str
    #: where the guest runs, and where its secondary is (or was: for
    #: ``secondary_lost``, the lost one; after a failover, None)
    primary_host: Optional[str] = None
    secondary_host: Optional[str] = None
    #: the pair: a new one each time the guest is protected
    pair_id: str = ''
    #: the last epoch the secondary holds (after a failover: the one the
    #: guest resumed from)
    last_committed_epoch: int = 0
    #: why: the loss, the failover's trigger, the error
    reason: str = ''
    #: failover.end: how long the takeover took, detection to running
    failover_ms: Optional[float] = None
