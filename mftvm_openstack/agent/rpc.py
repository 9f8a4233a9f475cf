"""Server side of the agent's RPC API: check every request, then delegate.

:class:`AgentEndpoint` is what an agent's RPC server dispatches to (see
:mod:`mftvm_openstack.agent.service`). It trusts nothing it receives: each
argument is checked (types, required and unknown keys, names, option
ranges) before the manager sees it, and a bad one is refused with
:class:`~mftvm_openstack.agent.exception.InvalidRequest` naming the
field. ``spec`` and ``options`` are parsed into the contract's
:class:`~mftvm_openstack.contract.spec.GuestSpec` and
:class:`~mftvm_openstack.contract.spec.ProtectionOptions` (every field
typed and range-checked, unknown fields refused) before anything runs::

    endpoint = AgentEndpoint(manager, host='hv1')
    endpoint.protect({}, instance='vm 0', spec={}, options={})
    # InvalidRequest: invalid request: instance must match
    #   ^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$ (got 'vm 0')
    endpoint.protect({}, instance='vm0', spec={...},
                     options={'epoch_ms': 5})
    # InvalidRequest: invalid request: options.epoch_ms must be from 20
    #   to 10000 (got 5)

The manager's own errors (:class:`~mftvm_openstack.agent.exception.\
MftvmError` and subclasses) go back to the caller as they are. Any other
exception is logged here with its traceback and answered as
:class:`~mftvm_openstack.agent.exception.InternalError`, one line: a
request never brings the agent down. Unknown methods and versions are
refused by oslo.messaging itself (``NoSuchMethod``,
``UnsupportedVersion``).

Version 1.1 of the API (client: :mod:`mftvm_openstack.agent.rpcapi`)::

    prepare_secondary(instance, spec, options, primary_host) -> dict
    protect(instance, spec, options, secondary_host=None)    -> status
    unprotect(instance)                                       -> status
    failover(instance)                          -> FailoverResult
    stop_instance(instance)                                   -> dict
    status(instance)                                          -> status
    list()                                                    -> [status]
    disk_settled(instance)                           -> dict (1.1)

where a status is an :class:`~mftvm_openstack.contract.status.\
InstanceStatus` as a JSON object.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
from collections.abc import Callable
from typing import Any, Optional, Protocol

from oslo_service import backend as _backend

if _backend.get_backend_type() is None:
    # oslo.messaging imports oslo_service.service, which fixes the backend
    _backend.init_backend(_backend.BackendType.THREADING)

import oslo_messaging  # noqa: E402
from oslo_serialization import jsonutils  # noqa: E402

from mftvm_openstack.agent import exception  # noqa: E402
from mftvm_openstack.contract import spec as contract_spec  # noqa: E402
from mftvm_openstack.contract.record import ContractError  # noqa: E402
from mftvm_openstack.contract.spec import (  # noqa: E402
    GuestSpec,
    ProtectionOptions,
)

LOG = logging.getLogger(__name__)

#: instance names (a libvirt/QEMU-safe, path-safe token)
NAME_PATTERN = f'^{contract_spec.NAME_PATTERN}$'
#: host names: the same characters, up to the length of an FQDN
HOST_PATTERN = f'^{contract_spec.HOST_PATTERN}$'
_NAME_RE = re.compile(NAME_PATTERN)
_HOST_RE = re.compile(HOST_PATTERN)


class Manager(Protocol):
    """What the endpoint needs of the agent's manager."""

    def prepare_secondary(self, instance: str, spec: GuestSpec,
                          options: ProtectionOptions,
                          primary_host: str) -> dict[str, Any]: ...

    def protect(self, instance: str, spec: GuestSpec,
                options: ProtectionOptions,
                secondary_host: Optional[str]) -> dict[str, Any]: ...

    def unprotect(self, instance: str) -> dict[str, Any]: ...

    def failover(self, instance: str) -> dict[str, Any]: ...

    def stop_instance(self, instance: str) -> dict[str, Any]: ...

    def disk_settled(self, instance: str) -> dict[str, Any]: ...

    def status(self, instance: str) -> dict[str, Any]: ...

    def list(self) -> list[dict[str, Any]]: ...


# -- checks -----------------------------------------------------------------

def _invalid(field: str, reason: str) -> exception.InvalidRequest:
    return exception.InvalidRequest(field=field, reason=reason)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + '...'


def check_name(field: str, value: Any, pattern: re.Pattern[str] = _NAME_RE,
               ) -> str:
    if not isinstance(value, str):
        raise _invalid(field, f'must be a string (got '
                       f'{type(value).__name__})')
    if not pattern.fullmatch(value):    # match() lets 'vm0\n' in
        raise _invalid(field, f'must match {pattern.pattern} (got '
                       f'{_shown(value)})')
    return value


def check_host(field: str, value: Any, optional: bool = False,
               ) -> Optional[str]:
    if value is None and optional:
        return None
    return check_name(field, value, _HOST_RE)


def _object(field: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _invalid(field, f'must be a dict (got '
                       f'{type(value).__name__})')
    for key in value:
        if not isinstance(key, str):
            raise _invalid(field, f'keys must be strings (got '
                           f'{_shown(key)})')
    return value


def check_spec(value: Any) -> GuestSpec:
    """The guest spec, every field checked (:class:`GuestSpec`)."""
    try:
        return GuestSpec.from_dict(_object('spec', value), 'spec')
    except ContractError as exc:
        raise _invalid(exc.field, exc.reason) from None


def check_own_domain(instance: str, spec: GuestSpec) -> GuestSpec:
    """A spec that names a libvirt domain names it for ``instance``: the
    instance process adopts a domain only if it is ``spec.name``'s own
    (its uuid, for Nova's), so ``spec.name`` must be the instance the
    call is about, not another guest of the host."""
    if spec.domain and spec.name != instance:
        raise _invalid('spec.name', f'must be the instance ({instance!r}) '
                       f'when spec.domain names its libvirt domain (got '
                       f'{_shown(spec.name)})')
    return spec


def check_options(value: Any) -> ProtectionOptions:
    """The protection options, each checked (:class:`ProtectionOptions`).

    Every option may be left out; the manager fills in the ``[ft]``
    defaults.
    """
    try:
        return ProtectionOptions.from_dict(_object('options', value),
                                           'options')
    except ContractError as exc:
        raise _invalid(exc.field, exc.reason) from None


# -- dispatch ---------------------------------------------------------------

def _request(func: Callable[..., Any]) -> Callable[..., Any]:
    """An RPC method: arguments checked, errors turned into MftvmError.

    oslo.messaging calls ``method(ctxt, **kwargs)`` with whatever the
    client sent; missing and unknown arguments become InvalidRequest
    here instead of a TypeError. MftvmError is marked expected, so the
    RPC server replies with it without logging a traceback.
    """
    params = list(inspect.signature(func).parameters.values())[2:]
    known = [p.name for p in params]
    required = [p.name for p in params if p.default is p.empty]
    name = func.__name__

    def inner(self: AgentEndpoint, ctxt: Any, **kwargs: Any) -> Any:
        for key in kwargs:
            if key not in known:
                raise _invalid(key, f'is not an argument of {name} '
                               f'(arguments: {", ".join(known) or "none"})')
        for key in required:
            if key not in kwargs:
                raise _invalid(key, 'is required')
        try:
            result = func(self, ctxt, **kwargs)
            jsonutils.dumps(result)      # fail here, not in the reply
            return result
        except exception.MftvmError as exc:
            LOG.info('%s refused: %s', name, exc)
            raise
        except Exception as exc:
            LOG.exception('%s(%s) failed', name, _shown(kwargs))
            reason = exception._one_line(str(exc))
            reason = (f'{type(exc).__name__}: {reason}' if reason
                      else type(exc).__name__)
            raise exception.InternalError(
                method=name, host=self.host, reason=reason) from None

    wrapped = oslo_messaging.expected_exceptions(exception.MftvmError)(inner)
    return functools.update_wrapper(wrapped, func)


class AgentEndpoint:
    """The agent's RPC methods, version 1.1 (default namespace).

    ``manager`` does the work (:class:`Manager`); ``host`` only names
    this agent in error messages.
    """

    target = oslo_messaging.Target(version='1.1', namespace=None)

    def __init__(self, manager: Manager, host: Optional[str] = None) -> None:
        self.manager = manager
        self.host = host or '?'

    @_request
    def prepare_secondary(self, ctxt: Any, instance: Any, spec: Any,
                          options: Any, primary_host: Any) -> Any:
        instance = check_name('instance', instance)
        spec = check_own_domain(instance, check_spec(spec))
        options = check_options(options)
        primary_host = check_host('primary_host', primary_host)
        LOG.info('prepare_secondary %s (primary %s)', instance,
                 primary_host)
        return self.manager.prepare_secondary(instance, spec, options,
                                              primary_host)

    @_request
    def protect(self, ctxt: Any, instance: Any, spec: Any, options: Any,
                secondary_host: Any = None) -> Any:
        instance = check_name('instance', instance)
        spec = check_own_domain(instance, check_spec(spec))
        options = check_options(options)
        secondary_host = check_host('secondary_host', secondary_host,
                                    optional=True)
        LOG.info('protect %s (secondary %s)', instance,
                 secondary_host or 'to be chosen')
        return self.manager.protect(instance, spec, options, secondary_host)

    @_request
    def unprotect(self, ctxt: Any, instance: Any) -> Any:
        instance = check_name('instance', instance)
        LOG.info('unprotect %s', instance)
        return self.manager.unprotect(instance)

    @_request
    def failover(self, ctxt: Any, instance: Any) -> Any:
        instance = check_name('instance', instance)
        LOG.info('failover %s', instance)
        return self.manager.failover(instance)

    @_request
    def stop_instance(self, ctxt: Any, instance: Any) -> Any:
        instance = check_name('instance', instance)
        LOG.info('stop_instance %s', instance)
        return self.manager.stop_instance(instance)

    @_request
    def disk_settled(self, ctxt: Any, instance: Any) -> Any:
        instance = check_name('instance', instance)
        LOG.info('disk_settled %s', instance)
        return self.manager.disk_settled(instance)

    @_request
    def status(self, ctxt: Any, instance: Any) -> Any:
        return self.manager.status(check_name('instance', instance))

    @_request
    def list(self, ctxt: Any) -> Any:
        return self.manager.list()
