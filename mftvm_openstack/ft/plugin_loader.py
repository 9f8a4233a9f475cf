"""Loading one engine plugin class by its entry-point name.

The names come from :mod:`mftvm_openstack.contract.plugins`; this module
turns one into a class, through stevedore, and tells the two ways that
can go wrong apart: a name nobody registered, and a registered plugin
that cannot be imported (a missing dependency, a typo in the package
that registered it)::

    cls = load_plugin_class(plugins.DISK_SYNC_NAMESPACE, 'block-copy',
                            kind='disk sync', base=DiskSync,
                            error=DiskError)
    # DiskError: unknown disk sync 'blok-copy': use one of ...
    # DiskError: disk sync plugin 'x' failed to load: ImportError: ...

Nothing else is caught: a bug in the engine is not a missing plugin.
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any, NoReturn

from stevedore import driver, exception

from mftvm_openstack.contract import plugins

LOG = logging.getLogger(__name__)


def load_plugin_class(namespace: str, name: str, *, kind: str,
                      base: type, error: type[Exception],
                      choices: tuple[str, ...] | None = None) -> Any:
    """The class registered as ``name`` in ``namespace``, a subclass of
    ``base`` (typed ``Any``: mypy takes no abstract class as ``type[T]``).

    ``kind`` names the plugin type in messages; ``error`` is the
    exception raised for an unknown, broken or wrong plugin; ``choices``
    are the names an "unknown" message offers (default: the namespace's).
    """
    def failed(_manager: Any, entry_point: importlib.metadata.EntryPoint,
               exc: BaseException) -> NoReturn:
        # stevedore calls this from inside its handler of whatever the
        # import raised: our error replaces it, with it as the cause.
        raise error(f'{kind} plugin {name!r} ({entry_point.value}) failed '
                    f'to load: {type(exc).__name__}: {exc}') from exc

    try:
        mgr: driver.DriverManager = driver.DriverManager(
            namespace, name, invoke_on_load=False,
            on_load_failure_callback=failed,
            on_missing_entrypoints_callback=None)
    except exception.NoMatches:
        offered = plugins.names(namespace) if choices is None else choices
        raise error(f'unknown {kind} {name!r}: use one of '
                    f'{", ".join(offered)}') from None
    except exception.MultipleMatches as exc:
        raise error(f'{kind} {name!r} is registered by more than one '
                    f'package: {exc}') from None
    cls = mgr.driver
    if not (isinstance(cls, type) and issubclass(cls, base)):
        target = mgr.extensions[0].entry_point.value
        raise error(f'{kind} plugin {name!r} ({target}) is not a '
                    f'{base.__name__}')
    LOG.info('%s %s: %s.%s', kind, name, cls.__module__, cls.__qualname__)
    return cls
