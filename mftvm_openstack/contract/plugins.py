"""The names of the engine's plugins, from their entry points.

Dirty trackers and disk syncs are stevedore plugins: any installed
package may add one under these entry-point groups. Everything that lists
or checks a plugin name (the ``[ft]`` options' choices, the agent's RPC
check, the CLI's help) asks here, so a plugin registered by another
package works everywhere its name is accepted::

    names(DISK_SYNC_NAMESPACE)   # ('async-replication', 'block-copy', ...)

Reading entry points is cheap and needs nothing of the engine (no
stevedore, no numpy): the engine loads the plugin itself.
"""

from __future__ import annotations

from importlib import metadata

TRACKER_NAMESPACE = 'mftvm.ft.trackers'
DISK_SYNC_NAMESPACE = 'mftvm.ft.disk_sync'

#: the tracker choice that picks the best one this host supports
AUTO_TRACKER = 'auto'
DEFAULT_DISK_SYNC = 'async-replication'


def names(namespace: str) -> tuple[str, ...]:
    """The plugin names registered under ``namespace``: the default
    first (for disk syncs), the rest in alphabetical order (installers
    sort entry points anyway)."""
    found = sorted({ep.name for ep in metadata.entry_points(group=namespace)})
    if DEFAULT_DISK_SYNC in found:
        found.remove(DEFAULT_DISK_SYNC)
        found.insert(0, DEFAULT_DISK_SYNC)
    return tuple(found)


def tracker_choices() -> tuple[str, ...]:
    """What a caller may ask for as the tracker: ``auto`` or a plugin."""
    return (AUTO_TRACKER, *names(TRACKER_NAMESPACE))


def disk_sync_choices() -> tuple[str, ...]:
    return names(DISK_SYNC_NAMESPACE)
