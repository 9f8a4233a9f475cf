"""Whether a server asks for fault tolerance, and with which options.

Two places request FT for a server:

* its flavor, through extra specs in the ``ft`` namespace (set by
  operators, e.g. in Horizon's flavor editor)::

      openstack flavor set m1.ft --property ft:enabled=true \\
          --property ft:epoch_ms=100

* its metadata, key ``ft`` (set by users)::

      openstack server create --property ft=true ...

:func:`get_ft_request` reads both and answers with an :class:`FTRequest`;
:func:`for_instance` does the same for a Nova ``Instance``::

    >>> get_ft_request({'ft:epoch_ms': '100'}, {'ft': 'yes'})
    FTRequest(enabled=True, epoch_ms=100, disk_sync=None)
    >>> get_ft_request({'ft:epoch_ms': '100'}, {'ft': 'yes'}).agent_options()
    {'epoch_ms': 100}
    >>> get_ft_request({}, {}).enabled
    False
    >>> get_ft_request({}, {'ft': 'maybe'})
    Traceback (most recent call last):
      ...
    mftvm_openstack.nova.ft_request.InvalidFTRequest: server metadata 'ft': \
'maybe' is not a boolean (true/false, yes/no, on/off, 1/0)

The rules:

* Booleans are spelled as Nova spells them
  (``oslo_utils.strutils.bool_from_string``, strict): ``true``/``false``,
  ``yes``/``no``, ``on``/``off``, ``y``/``n``, ``t``/``f``, ``1``/``0``,
  in any case, surrounding blanks ignored.
* FT is on when the flavor's ``ft:enabled`` or the metadata's ``ft`` is
  true. One saying true while the other explicitly says false is a
  conflict (:class:`FTRequestConflict`), as Nova does for
  ``hw:mem_encryption``: an operator's "no" in the flavor is not overridden
  by a user, nor is a user's explicit "no" silently ignored.
* Tuning (``ft:epoch_ms``, ``ft:disk_sync``) comes from the flavor only:
  it sets what protection costs the hosts, which is the operator's call.
  Metadata keys in the ``ft:`` namespace are refused, so that a misplaced
  ``--property ft:epoch_ms=50`` fails loudly instead of being ignored.
* The flavor's ``ft:`` extra specs are checked here again, whether FT is
  requested or not: Nova's API validates extra specs only from
  microversion 2.86 on, so an older client can store anything. Unknown
  ``ft:`` keys are refused, as the API does.
* An option that is not set stays ``None``: the agent applies its
  ``[ft]`` defaults (200 ms epochs, ``async-replication``).

Every error is an :class:`InvalidFTRequest` (a ``ValueError``) whose
message starts with where the bad value is and its key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Optional

from oslo_utils import strutils

from mftvm_openstack.contract import plugins
from mftvm_openstack.contract.limits import EPOCH_MS_RANGE
from mftvm_openstack.contract.spec import ProtectionOptions

#: the extra-spec namespace (``ft:...``)
NAMESPACE = 'ft'
#: flavor extra spec: request FT for every server of the flavor
ENABLED = 'ft:enabled'
#: flavor extra spec: epoch (checkpoint interval) length, milliseconds
EPOCH_MS = 'ft:epoch_ms'
#: flavor extra spec: how the disk reaches the secondary
DISK_SYNC = 'ft:disk_sync'
#: server metadata key requesting FT for one server
METADATA_KEY = 'ft'

#: the epoch lengths the agent accepts (``[ft] epoch_ms``)
EPOCH_MS_MIN, EPOCH_MS_MAX = EPOCH_MS_RANGE
#: the disk-sync plugins (stevedore namespace ``mftvm.ft.disk_sync``)
DISK_SYNC_CHOICES = plugins.disk_sync_choices()

#: where a value came from, as error messages name it
FLAVOR = 'flavor extra spec'
METADATA = 'server metadata'

_BOOL_SPELLINGS = 'true/false, yes/no, on/off, 1/0'


class InvalidFTRequest(ValueError):
    """A flavor extra spec or a metadata item of the ``ft`` family is bad.

    ``source`` is :data:`FLAVOR` or :data:`METADATA`, ``key`` the key
    (``'ft:epoch_ms'``), ``value`` the value as given, ``reason`` what is
    wrong with it. ``str()`` gives ``"<source> '<key>': <reason>"``.
    """

    def __init__(self, source: str, key: str, value: Any,
                 reason: str) -> None:
        self.source = source
        self.key = key
        self.value = value
        self.reason = reason
        super().__init__(f'{source} {key!r}: {reason}')


class FTRequestConflict(InvalidFTRequest):
    """The flavor and the server's metadata disagree about FT."""


@dataclasses.dataclass(frozen=True)
class FTRequest:
    """What a server asks for.

    ``epoch_ms`` and ``disk_sync`` are ``None`` when the flavor does not
    set them (the agent's defaults apply).
    """

    enabled: bool
    epoch_ms: Optional[int] = None
    disk_sync: Optional[str] = None

    def agent_options(self) -> dict[str, Any]:
        """The options to hand to the agent's ``protect`` call.

        Only the options that were set: a
        :class:`~mftvm_openstack.contract.spec.ProtectionOptions` as JSON.
        """
        return ProtectionOptions(epoch_ms=self.epoch_ms,
                                 disk_sync=self.disk_sync).to_dict()


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + '...'


def parse_bool(source: str, key: str, value: Any) -> bool:
    """``value`` as a boolean, spelled as Nova accepts it (strict)."""
    try:
        return strutils.bool_from_string(value, strict=True)
    except ValueError:
        raise InvalidFTRequest(
            source, key, value,
            f'{_shown(value)} is not a boolean ({_BOOL_SPELLINGS})',
        ) from None


def parse_epoch_ms(source: str, key: str, value: Any) -> int:
    """``value`` as an epoch length in ms, within the agent's range."""
    number: Optional[int] = None
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value)     # as Nova's validator: ' 100 ', '+100'
        except ValueError:
            pass
    if number is None:
        raise InvalidFTRequest(
            source, key, value,
            f'{_shown(value)} is not an integer number of milliseconds',
        )
    if not EPOCH_MS_MIN <= number <= EPOCH_MS_MAX:
        raise InvalidFTRequest(
            source, key, value,
            f'{number} is out of range (milliseconds from {EPOCH_MS_MIN} '
            f'to {EPOCH_MS_MAX})',
        )
    return number


def parse_disk_sync(source: str, key: str, value: Any) -> str:
    """``value`` as the name of a disk-sync plugin."""
    choices = plugins.disk_sync_choices()   # a plugin added since import
    if value not in choices:
        raise InvalidFTRequest(
            source, key, value,
            f'{_shown(value)} is not one of: {", ".join(choices)}',
        )
    return value


def _in_namespace(key: Any) -> bool:
    return isinstance(key, str) and key.startswith(NAMESPACE + ':')


def get_ft_request(extra_specs: Optional[Mapping[str, Any]],
                   metadata: Optional[Mapping[str, Any]]) -> FTRequest:
    """Whether FT is requested, and how, from a flavor and a server.

    :param extra_specs: the flavor's extra specs (``flavor.extra_specs``);
        ``None`` counts as empty.
    :param metadata: the server's metadata (``instance.metadata``);
        ``None`` counts as empty.
    :raises InvalidFTRequest: a value is bad, or an ``ft:`` key is not
        known (flavor) or not allowed (metadata); the message names the
        key.
    :raises FTRequestConflict: the flavor and the metadata disagree.
    """
    extra_specs = extra_specs or {}
    metadata = metadata or {}

    known = (ENABLED, EPOCH_MS, DISK_SYNC)
    for key in sorted(k for k in extra_specs if _in_namespace(k)):
        if key not in known:
            raise InvalidFTRequest(
                FLAVOR, key, extra_specs[key],
                f'is not a known extra spec (known: {", ".join(known)})',
            )
    for key in sorted(k for k in metadata if _in_namespace(k)):
        hint = ('set it as a flavor extra spec' if key in known
                else f'the known keys are {", ".join(known)}, set as '
                     f'flavor extra specs')
        raise InvalidFTRequest(
            METADATA, key, metadata[key],
            f'the {NAMESPACE}: namespace is not allowed in server metadata '
            f'(request FT with {METADATA_KEY}=true; to tune it, {hint})',
        )

    flavor_enabled: Optional[bool] = None
    if ENABLED in extra_specs:
        flavor_enabled = parse_bool(FLAVOR, ENABLED, extra_specs[ENABLED])
    epoch_ms: Optional[int] = None
    if EPOCH_MS in extra_specs:
        epoch_ms = parse_epoch_ms(FLAVOR, EPOCH_MS, extra_specs[EPOCH_MS])
    disk_sync: Optional[str] = None
    if DISK_SYNC in extra_specs:
        disk_sync = parse_disk_sync(FLAVOR, DISK_SYNC,
                                    extra_specs[DISK_SYNC])

    meta_enabled: Optional[bool] = None
    if METADATA_KEY in metadata:
        meta_enabled = parse_bool(METADATA, METADATA_KEY,
                                  metadata[METADATA_KEY])

    if (flavor_enabled is not None and meta_enabled is not None
            and flavor_enabled != meta_enabled):
        raise FTRequestConflict(
            METADATA, METADATA_KEY, metadata[METADATA_KEY],
            f'{_shown(metadata[METADATA_KEY])} conflicts with {FLAVOR} '
            f'{ENABLED!r}={_shown(extra_specs[ENABLED])}',
        )

    return FTRequest(enabled=bool(flavor_enabled or meta_enabled),
                     epoch_ms=epoch_ms, disk_sync=disk_sync)


def for_instance(instance: Any) -> FTRequest:
    """:func:`get_ft_request` for a Nova ``Instance`` (or a look-alike).

    Reads ``instance.flavor.extra_specs`` and ``instance.metadata``.
    """
    flavor = getattr(instance, 'flavor', None)
    extra_specs = getattr(flavor, 'extra_specs', None)
    return get_ft_request(extra_specs, getattr(instance, 'metadata', None))
