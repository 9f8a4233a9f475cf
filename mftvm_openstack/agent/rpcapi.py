"""Client side of the agent's RPC API (topic ``mftvm-agent``).

Every agent listens on topic :data:`TOPIC` with its host name
(``[agent] host``) as server name; a call names the host it goes to::

    from mftvm_openstack import conf
    from mftvm_openstack.agent import rpcapi

    transport = rpcapi.get_transport(conf.CONF)   # [DEFAULT] transport_url
    api = rpcapi.AgentAPI(transport)
    api.list({}, 'hv1')                     # [{'instance': 'vm0', ...}]
    api.protect({}, 'hv1', 'vm0', GuestSpec(...),
                ProtectionOptions(epoch_ms=100),
                secondary_host='hv2')      # may take minutes
    api.failover({}, 'hv2', 'vm0')

``ctxt`` is a dict (or a RequestContext: its ``to_dict()`` is sent).
``spec`` and ``options`` are the contract's records (or their JSON
objects); the agent checks them again on arrival.
Errors arrive as the classes of :mod:`mftvm_openstack.agent.exception`
with a one-line message; an agent that does not answer in time raises
:class:`~mftvm_openstack.agent.exception.PeerUnreachable`. The server side
is :mod:`mftvm_openstack.agent.rpc`.

Importing this module selects oslo.service's threading backend unless the
process chose one already: oslo.messaging imports ``oslo_service.service``,
which would otherwise fix the (deprecated) eventlet backend.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Callable, Mapping
from typing import Any, Optional, TypeVar

from oslo_service import backend as _backend

if _backend.get_backend_type() is None:
    _backend.init_backend(_backend.BackendType.THREADING)

import oslo_messaging  # noqa: E402
from oslo_config import cfg  # noqa: E402

from mftvm_openstack import conf as mftvm_conf  # noqa: E402
from mftvm_openstack.agent import exception  # noqa: E402
from mftvm_openstack.contract.record import Record  # noqa: E402
from mftvm_openstack.contract.spec import (  # noqa: E402
    GuestSpec,
    ProtectionOptions,
)

TOPIC = 'mftvm-agent'
#: the exchange of the agents' topics, fixed so that a client in another
#: service (Nova's compute driver: control_exchange 'nova') meets them
EXCHANGE = 'mftvm'

_F = TypeVar('_F', bound=Callable[..., Any])

# user:password@ in each host of a transport URL (several hosts are
# separated by commas); the password may hold anything but '@'
_PASSWORD_RE = re.compile(r'((?:://|,)[^:/@,]*:)[^@]*?@')
# the same at the start of a URL without scheme (malformed)
_BARE_PASSWORD_RE = re.compile(r'^([^:/@,]*:)[^@]*?@')


def mask_url(url: Optional[str]) -> str:
    """The transport URL with every password replaced by ``***``::

        mask_url('rabbit://nova:s3cr3t@10.0.0.5:5672/')
        # 'rabbit://nova:***@10.0.0.5:5672/'
    """
    if url is None:
        return '<none>'
    text = str(url)
    if '://' not in text:
        text = _BARE_PASSWORD_RE.sub(r'\1***@', text)
    return _PASSWORD_RE.sub(r'\1***@', text)


def get_transport(conf: cfg.ConfigOpts = mftvm_conf.CONF,
                  url: Optional[str] = None) -> oslo_messaging.Transport:
    """An RPC transport for ``url`` (default ``[DEFAULT] transport_url``).

    Clients built on it rebuild the agent's exceptions. A malformed URL
    or an unknown driver raises
    :class:`~mftvm_openstack.agent.exception.TransportError`, whose message
    shows the URL with its password masked. Nothing is connected yet: see
    :func:`check_transport`.
    """
    shown = mask_url(url if url is not None else _conf_url(conf))
    try:
        return oslo_messaging.get_rpc_transport(
            conf, url=url,
            allowed_remote_exmods=exception.ALLOWED_REMOTE_EXMODS)
    except oslo_messaging.DriverLoadFailure as exc:
        driver = getattr(exc, 'driver', None) or '?'
        raise exception.TransportError(
            url=shown, reason=f'no messaging driver "{driver}"') from None
    except (oslo_messaging.InvalidTransportURL, ValueError, TypeError):
        # the library's own message repeats the URL with its password
        raise exception.TransportError(
            url=shown, reason='malformed URL (expected '
            'driver://[user:pass@]host:port[,...]/[vhost])') from None


def configured_transport_url(conf: cfg.ConfigOpts) -> Optional[str]:
    """``[DEFAULT] transport_url`` if a config file (or an override) sets
    it; its default does not count."""
    try:
        # registers oslo.messaging's [DEFAULT] options on conf
        oslo_messaging.TransportURL.parse(conf)
    except Exception:
        pass        # get_transport() reports it
    location = conf.get_location('transport_url')
    if location is None or location.location == cfg.Locations.opt_default:
        return None
    return conf.transport_url or None


def _conf_url(conf: cfg.ConfigOpts) -> Optional[str]:
    try:
        return conf.transport_url
    except cfg.NoSuchOptError:
        return None


def check_transport(transport: oslo_messaging.Transport,
                    conf: cfg.ConfigOpts = mftvm_conf.CONF,
                    url: Optional[str] = None) -> None:
    """Raise TransportError unless the broker takes a message now.

    Sends one cast, without retries, to a server name nobody listens on
    (the broker drops it). ``url`` only serves the error message.
    """
    target = oslo_messaging.Target(
        exchange=EXCHANGE, topic=TOPIC,
        server=f'mftvm-check-{uuid.uuid4().hex[:12]}')
    client = oslo_messaging.get_rpc_client(transport, target, retry=0)
    try:
        client.cast({}, 'check')
    except Exception as exc:  # the drivers raise many types here
        shown = mask_url(url if url is not None else _conf_url(conf))
        reason = mask_url(exception._one_line(str(exc))) or \
            type(exc).__name__
        raise exception.TransportError(
            url=shown, reason=f'cannot reach or log in to the broker '
            f'({reason})') from None


def _context(ctxt: Any) -> dict[str, Any]:
    if ctxt is None:
        return {}
    if isinstance(ctxt, Mapping):
        return dict(ctxt)
    return dict(ctxt.to_dict())


def _payload(value: Record | Mapping[str, Any]) -> Any:
    """A record as its JSON object; anything else as it is (the agent
    refuses what does not fit)."""
    return value.to_dict() if isinstance(value, Record) else value


def _clean_errors(method: _F) -> _F:
    """Re-raise remote errors as plain local ones, timeouts as
    PeerUnreachable."""

    @functools.wraps(method)
    def inner(self: AgentAPI, ctxt: Any, host: str, *args: Any,
              **kwargs: Any) -> Any:
        if not isinstance(host, str) or not host:
            raise exception.InvalidRequest(
                field='host', reason='must name the agent\'s host')
        try:
            return method(self, ctxt, host, *args, **kwargs)
        except oslo_messaging.MessagingTimeout:
            raise exception.PeerUnreachable(
                host=host, reason=f'no answer to {method.__name__} within '
                f'{self.timeout_of(method.__name__):g} s') from None
        except (exception.MftvmError, oslo_messaging.UnsupportedVersion,
                oslo_messaging.NoSuchMethod) as exc:
            raise exception.from_remote(exc) from None

    return inner  # type: ignore[return-value]


class AgentAPI:
    """Client side of the agent RPC API.

    API version history:

    * 1.0 - Initial version: prepare_secondary, protect, unprotect,
      failover, stop_instance, status, list.
    * 1.1 - disk_settled.

    ``protect`` may take ``[agent] protect_timeout`` seconds (initial
    disk sync included); the server heartbeats it, so a dead agent is
    still noticed after ``[DEFAULT] rpc_response_timeout``. Every other
    call times out after ``timeout`` (default ``rpc_response_timeout``).
    ``retry`` limits reconnections to the broker (None: forever).
    """

    RPC_API_VERSION = '1.1'

    def __init__(self, transport: oslo_messaging.Transport,
                 conf: cfg.ConfigOpts = mftvm_conf.CONF,
                 timeout: Optional[float] = None,
                 retry: Optional[int] = None) -> None:
        self.conf = conf
        target = oslo_messaging.Target(exchange=EXCHANGE, topic=TOPIC,
                                       version=self.RPC_API_VERSION)
        self.client = oslo_messaging.get_rpc_client(
            transport, target, version_cap=self.RPC_API_VERSION,
            retry=retry)
        self.timeout = float(timeout if timeout is not None
                             else transport.conf.rpc_response_timeout)

    def timeout_of(self, method: str) -> float:
        """Seconds a call of ``method`` waits for its answer."""
        if method == 'protect':
            return float(self.conf.agent.protect_timeout)
        return self.timeout

    def _prepare(self, host: str, timeout: Optional[float] = None,
                 version: str = '1.0', **kwargs: Any) -> Any:
        return self.client.prepare(
            server=host, version=version,
            timeout=self.timeout if timeout is None else timeout, **kwargs)

    @_clean_errors
    def prepare_secondary(self, ctxt: Any, host: str, instance: str,
                          spec: GuestSpec | Mapping[str, Any],
                          options: ProtectionOptions | Mapping[str, Any],
                          primary_host: str) -> dict[str, Any]:
        """Make ``host`` ready to hold ``instance`` for ``primary_host``."""
        return self._prepare(host).call(
            _context(ctxt), 'prepare_secondary', instance=instance,
            spec=_payload(spec), options=_payload(options),
            primary_host=primary_host)

    @_clean_errors
    def protect(self, ctxt: Any, host: str, instance: str,
                spec: GuestSpec | Mapping[str, Any],
                options: ProtectionOptions | Mapping[str, Any],
                secondary_host: Optional[str] = None) -> dict[str, Any]:
        """Run ``instance`` on ``host``, protected by ``secondary_host``."""
        total = self.timeout_of('protect')
        # the agent heartbeats every half of it (whole seconds >= 1)
        silence = max(10.0, min(self.timeout, total))
        cctxt = self._prepare(host, timeout=total,
                              call_monitor_timeout=silence)
        try:
            return cctxt.call(
                _context(ctxt), 'protect', instance=instance,
                spec=_payload(spec), options=_payload(options),
                secondary_host=secondary_host)
        except oslo_messaging.MessagingTimeout:
            raise exception.PeerUnreachable(
                host=host, reason=f'no answer to protect (silent for '
                f'{silence:g} s, or busy over {total:g} s)') from None

    @_clean_errors
    def unprotect(self, ctxt: Any, host: str,
                  instance: str) -> dict[str, Any]:
        """Drop the secondary; the instance keeps running unprotected."""
        return self._prepare(host).call(
            _context(ctxt), 'unprotect', instance=instance)

    @_clean_errors
    def failover(self, ctxt: Any, host: str,
                 instance: str) -> dict[str, Any]:
        """Make ``host`` (the secondary) run the instance now."""
        return self._prepare(host).call(
            _context(ctxt), 'failover', instance=instance)

    @_clean_errors
    def stop_instance(self, ctxt: Any, host: str,
                      instance: str) -> dict[str, Any]:
        """Stop the instance's side on ``host``."""
        return self._prepare(host).call(
            _context(ctxt), 'stop_instance', instance=instance)

    @_clean_errors
    def disk_settled(self, ctxt: Any, host: str,
                     instance: str) -> dict[str, Any]:
        """Tell ``host``, which runs the instance taken over from its
        replica, that its disks were moved elsewhere: its replica is not
        kept when it ends (an agent of API 1.0 refuses:
        UnsupportedVersion)."""
        return self._prepare(host, version='1.1').call(
            _context(ctxt), 'disk_settled', instance=instance)

    @_clean_errors
    def status(self, ctxt: Any, host: str,
               instance: str) -> dict[str, Any]:
        """The instance as ``host`` sees it."""
        return self._prepare(host).call(
            _context(ctxt), 'status', instance=instance)

    @_clean_errors
    def list(self, ctxt: Any, host: str) -> list[dict[str, Any]]:
        """Every instance on ``host``."""
        return self._prepare(host).call(_context(ctxt), 'list')
