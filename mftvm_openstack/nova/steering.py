"""Which compute hosts can run FT servers, and how Nova is told.

A host can protect a server (as its primary) and hold one (as a
secondary) when both hold:

* **configured**: ``[libvirt] file_backed_memory`` is set in its
  nova.conf. The agent reads guest RAM from the domain's memory file;
  without one, ``protect`` cannot work. Read once, when nova-compute
  starts (Nova itself needs a restart for it);
* **reachable**: the local agent answered the driver's last look (the
  hand-off watcher's ``list``, every ``[ft] handoff_interval`` seconds).
  An agent that is down or on another message bus cannot protect. With
  the watch off (interval 0) only the configuration counts.

Such a host's compute node provider has the trait :data:`TRAIT`, which
the driver sets and removes in ``update_provider_tree`` (the resource
tracker calls it every ``[DEFAULT] update_resources_interval``, 60 s by
default: a host whose agent stops answering loses the trait within
that). The secondary is only chosen among hosts with it, and an FT
flavor lands only on them when it requires it too::

    openstack flavor set m1.ft --property ft:enabled=true \\
        --property trait:CUSTOM_MFTVM_FT=required

    >>> why_not_capable(file_backed_memory_mib=4096, agent_answers=True)
    >>> why_not_capable(file_backed_memory_mib=0, agent_answers=True)
    '[libvirt] file_backed_memory is not set in its nova.conf'
    >>> why_not_capable(file_backed_memory_mib=4096, agent_answers=False)
    'its mftvm-agent does not answer'
"""

from __future__ import annotations

from typing import Optional

#: the trait of a compute node that can protect FT servers
TRAIT = 'CUSTOM_MFTVM_FT'

#: the flavor extra spec that keeps an FT flavor on such hosts
FLAVOR_TRAIT_SPEC = f'trait:{TRAIT}'


def why_not_capable(file_backed_memory_mib: int,
                    agent_answers: bool) -> Optional[str]:
    """Why a host cannot protect FT servers, or None if it can."""
    if file_backed_memory_mib <= 0:
        return '[libvirt] file_backed_memory is not set in its nova.conf'
    if not agent_answers:
        return 'its mftvm-agent does not answer'
    return None
