"""Errors of the agent, carried over RPC as themselves.

An agent raises these; the caller, on another host, catches the same
classes. Each has a one-line message built from a format and keyword
arguments (kept in ``exc.kwargs``), in the manner of Nova's exceptions::

    from mftvm_openstack.agent import exception

    raise exception.InstanceNotFound(instance='vm0')
    # InstanceNotFound: instance vm0 is not known to this agent

    try:
        api.status(ctxt, 'hv2', 'vm0')
    except exception.InvalidRequest as exc:
        print(exc.kwargs['field'])      # which field was wrong
    except exception.MftvmError as exc:
        print(exc)                      # one line, no remote traceback

How they cross the wire: oslo.messaging serializes an exception as its
class, module, ``args`` and ``kwargs``, and the client rebuilds it with
``cls(*args, **kwargs)`` if the module is listed in the transport's
``allowed_remote_exmods`` (:data:`ALLOWED_REMOTE_EXMODS`, used by
:func:`mftvm_openstack.agent.rpcapi.get_transport`). The rebuilt object is
of a subclass whose ``str()`` appends the remote traceback;
:func:`from_remote` turns it back into a plain instance, which
:class:`~mftvm_openstack.agent.rpcapi.AgentAPI` does for every call. The
server marks :class:`MftvmError` as expected
(``oslo_messaging.expected_exceptions``): a refused request is not logged
with a traceback on the agent.
"""

from __future__ import annotations

from typing import Any, cast

#: modules whose exceptions an RPC client may rebuild (this one, and
#: oslo.messaging's dispatcher for UnsupportedVersion / NoSuchMethod)
ALLOWED_REMOTE_EXMODS = [
    __name__,
    'oslo_messaging.rpc.dispatcher',
]

_REMOTE_POSTFIX = '_Remote'


class MftvmError(Exception):
    """Base of the agent's errors: a one-line message.

    Give either a message, or the keyword arguments that ``msg_fmt``
    names; both survive the trip over RPC.
    """

    msg_fmt = 'the agent could not do this'

    def __init__(self, message: str | None = None, **kwargs: Any) -> None:
        self.kwargs = kwargs
        if message is None:
            try:
                message = self.msg_fmt % kwargs
            except (KeyError, TypeError, ValueError):
                message = f'{self.msg_fmt} ({kwargs})'
        self.message = _one_line(str(message))
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class InvalidRequest(MftvmError):
    """A request the agent refuses as malformed: names ``field``."""

    msg_fmt = 'invalid request: %(field)s %(reason)s'


class InstanceNotFound(MftvmError):
    """No instance of this name on the agent."""

    msg_fmt = 'instance %(instance)s is not known to this agent'


class Conflict(MftvmError):
    """The instance is not in a state that allows the request."""

    msg_fmt = 'instance %(instance)s: %(reason)s'


class InsufficientCapacity(MftvmError):
    """This host has no room for the guest (its RAM files or its disk
    replica): names the ``directory``, the bytes ``needed`` and
    ``available`` there, and ``what`` they are for."""

    msg_fmt = ('host %(host)s has no room for %(what)s in %(directory)s: '
               'needs %(needed_mib).1f MiB, %(available_mib).1f MiB '
               'available; free space there or enlarge it, or choose '
               'another host')


class PeerUnreachable(MftvmError):
    """The agent on another host did not answer."""

    msg_fmt = 'the agent on host %(host)s is unreachable: %(reason)s'


class InternalError(MftvmError):
    """An unexpected failure inside the agent (logged there in full)."""

    msg_fmt = '%(method)s failed on host %(host)s: %(reason)s'


class TransportError(MftvmError):
    """The messaging transport is misconfigured or the broker is down.

    Raised on the side that builds the transport (never over RPC); the
    message never contains a password.
    """

    msg_fmt = 'messaging transport %(url)s: %(reason)s'


def _one_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return ''
    return lines[0] if len(lines) == 1 else f'{lines[0]} ...'


def from_remote(exc: BaseException) -> BaseException:
    """A remote exception as a plain instance of its own class.

    oslo.messaging rebuilds an allowed remote exception as an instance of
    ``<Class>_Remote``, a subclass whose ``str()`` is the message followed
    by the remote traceback. This returns an instance of ``<Class>``
    itself with the same attributes and the first line as message.
    Anything else is returned unchanged::

        except exception.MftvmError as exc:
            raise exception.from_remote(exc) from None
    """
    cls = type(exc)
    if not cls.__name__.endswith(_REMOTE_POSTFIX):
        return exc
    base = cast(type[BaseException], next(
        (c for c in cls.__mro__[1:]
         if not c.__name__.endswith(_REMOTE_POSTFIX)), Exception))
    message = str(exc).split('\n', 1)[0]
    clean = base.__new__(base)
    clean.__dict__.update(exc.__dict__)
    clean.args = (message,)
    if isinstance(clean, MftvmError):
        clean.message = message
    return clean
