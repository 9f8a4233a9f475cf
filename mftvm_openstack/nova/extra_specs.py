"""Validators for ``ft`` namespaced flavor extra specs.

Nova's API checks flavor extra specs (from microversion 2.86 on) against
validators that it loads from the ``nova.api.extra_spec_validators``
entry point group: each entry point names a module whose ``register()``
returns a list of ``ExtraSpecValidator``. This package declares, in
``setup.cfg``::

    [entry_points]
    nova.api.extra_spec_validators =
        mftvm = mftvm_openstack.nova.extra_specs

so that, once it is installed next to nova-api::

    $ openstack --os-compute-api-version 2.86 flavor set m1.ft \\
          --property ft:enabled=true --property ft:epoch_ms=100
    $ openstack --os-compute-api-version 2.86 flavor set m1.ft \\
          --property ft:epoch_ms=5
    ... Validation failed; flavor extra spec 'ft:epoch_ms': 5 is out of
    range (milliseconds from 20 to 10000). (HTTP 400)

Registering any ``ft:`` key makes Nova treat the whole ``ft`` namespace as
known: an unknown key such as ``ft:foo`` is refused too.

Values are checked by the parsers of
:mod:`mftvm_openstack.nova.ft_request`, which reads the same keys when a
server is built (and checks them again, since flavors set through older
microversions were never validated), so the API refuses exactly the
values a build would, with the same message naming the key; Nova's own
check of the declared ``value`` (what its API reference shows) runs as
well.
"""

import dataclasses

from nova import exception
from nova.api.validation.extra_specs import base

from mftvm_openstack.nova import ft_request

_PARSERS = {
    ft_request.ENABLED: ft_request.parse_bool,
    ft_request.EPOCH_MS: ft_request.parse_epoch_ms,
    ft_request.DISK_SYNC: ft_request.parse_disk_sync,
}


@dataclasses.dataclass
class FTExtraSpecValidator(base.ExtraSpecValidator):
    """Nova's validator, with the messages of :mod:`.ft_request`.

    Nova's own messages do not name the extra spec (``Validation failed;
    '5' is less than the min value of '20'.``); ours do.
    """

    def validate(self, name, value):
        parse = _PARSERS.get(self.name)
        if parse is not None and name == self.name:
            try:
                parse(ft_request.FLAVOR, name, value)
            except ft_request.InvalidFTRequest as exc:
                raise exception.ValidationError(
                    f'Validation failed; {exc}.') from None
        super().validate(name, value)


EXTRA_SPEC_VALIDATORS = [
    FTExtraSpecValidator(
        name=ft_request.ENABLED,
        description=(
            'Whether servers of this flavor are fault tolerant: each runs '
            'on a primary host and is continuously checkpointed, every '
            'epoch, to a secondary host that continues it from the last '
            'checkpoint, with no reboot and no lost acknowledged output, '
            'if the primary fails. Nova schedules the secondary on '
            'another host and holds its resources in Placement. A user '
            'can also request fault tolerance for one server with the '
            'server metadata item ``ft=true``; a server whose metadata '
            'says ``ft=false`` cannot use a flavor that says ``true``, '
            'and the other way round. Only supported by compute hosts '
            'running the mftvm-openstack driver and agent.'
        ),
        value={
            'type': bool,
            'description': 'Whether to protect servers with a secondary',
        },
    ),
    FTExtraSpecValidator(
        name=ft_request.EPOCH_MS,
        description=(
            'Length of an epoch, in milliseconds, for fault-tolerant '
            'servers of this flavor (see ``ft:enabled``). At the end of '
            'each epoch the guest pauses briefly while its state is '
            'checkpointed, and the network packets it sent during the '
            'epoch are released only once the secondary holds that '
            'checkpoint. Shorter epochs lower the latency that clients '
            'see; longer ones cost the hosts less CPU and network. '
            'Defaults to the agent\'s ``[ft] epoch_ms`` (200). Only '
            'supported by compute hosts running the mftvm-openstack '
            'driver and agent.'
        ),
        value={
            'type': int,
            'description': 'Epoch length in milliseconds',
            'min': ft_request.EPOCH_MS_MIN,
            'max': ft_request.EPOCH_MS_MAX,
        },
    ),
    FTExtraSpecValidator(
        name=ft_request.DISK_SYNC,
        description=(
            'How the disks of fault-tolerant servers of this flavor (see '
            '``ft:enabled``) reach the secondary. ``async-replication`` '
            '(the default, the agent\'s ``[ft] disk_sync``) sends every '
            'guest write to the replica as it happens, without the guest '
            'waiting for it; each checkpoint waits for the last few. '
            '``write-replication`` makes each write wait until the replica '
            'has it (slower sync writes). ``block-copy`` copies the blocks '
            'written in each epoch inside its checkpoint, which lengthens '
            'the pause; it is kept as a baseline for comparisons. Only '
            'supported by compute hosts running the mftvm-openstack '
            'driver and agent.'
        ),
        value={
            'type': str,
            'description': 'The disk synchronisation method',
            'enum': list(ft_request.DISK_SYNC_CHOICES),
        },
    ),
]


def register():
    """The validators of the ``ft`` namespace (Nova's entry point hook)."""
    return EXTRA_SPEC_VALIDATORS
