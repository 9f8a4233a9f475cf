"""Glance's metadata definitions for the ``ft:`` flavor extra specs.

Horizon's "Update Metadata" dialog offers what Glance's metadefs catalog
lists. This writes the namespace of the FT flavor properties, made from
the flavor validators of :mod:`.extra_specs` (their names, descriptions,
types, minimums, maximums and choices), so that the dialog offers exactly
what the API accepts::

    $ python -m mftvm_openstack.nova.metadefs -o etc/metadefs/mftvm-ft.json
    $ python -m mftvm_openstack.nova.metadefs --check \\
          etc/metadefs/mftvm-ft.json        # exit 1 if it is stale
    $ glance-manage db load_metadefs --path etc/metadefs/mftvm-ft.json \\
          --merge --overwrite

The checked-in file is tested to be what this writes
(tests/unit/test_metadefs.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional

from mftvm_openstack import conf
from mftvm_openstack.contract import plugins
from mftvm_openstack.nova import extra_specs, ft_request

NAMESPACE = 'MFTVM::FaultTolerance'
RESOURCE_TYPE = 'OS::Nova::Flavor'
PREFIX = 'ft:'

#: what Horizon shows as each property's name
TITLES = {
    ft_request.ENABLED: 'Fault tolerant',
    ft_request.EPOCH_MS: 'Epoch length (ms)',
    ft_request.DISK_SYNC: 'Disk synchronisation',
}

#: what Horizon fills in when the property is added: on for ft:enabled
#: (adding it means wanting it), the agents' defaults for the others
DEFAULTS: dict[str, Any] = {
    ft_request.ENABLED: True,
    ft_request.EPOCH_MS: next(o.default for o in conf.ft_opts
                              if o.name == 'epoch_ms'),
    ft_request.DISK_SYNC: plugins.DEFAULT_DISK_SYNC,
}

_TYPES = {bool: 'boolean', int: 'integer', float: 'number', str: 'string'}


def _plain(text: str) -> str:
    # reStructuredText literals read as quotes in a dialog
    return text.replace('``', '"')


def namespace() -> dict[str, Any]:
    """The namespace, as ``glance-manage db load_metadefs`` and the
    metadefs API (``POST /v2/metadefs/namespaces``) take it."""
    properties = {}
    for v in extra_specs.register():
        assert v.name.startswith(PREFIX), v.name
        value = v.value
        prop: dict[str, Any] = {
            'title': TITLES[v.name],
            'description': _plain(v.description),
            'type': _TYPES[value['type']],
        }
        if 'enum' in value:
            prop['enum'] = list(value['enum'])
        if 'min' in value:
            prop['minimum'] = value['min']
        if 'max' in value:
            prop['maximum'] = value['max']
        prop['default'] = DEFAULTS[v.name]
        properties[v.name[len(PREFIX):]] = prop
    return {
        'namespace': NAMESPACE,
        'display_name': 'Fault Tolerance (mftvm-openstack)',
        'description': (
            'Fault-tolerant servers: each runs on a primary host and is '
            'checkpointed every epoch to a secondary host, which continues '
            'it from the last checkpoint if the primary fails. Needs compute '
            'hosts that run the mftvm-openstack driver and agent.'),
        'visibility': 'public',
        'protected': True,
        'resource_type_associations': [
            {'name': RESOURCE_TYPE, 'prefix': PREFIX}],
        'properties': properties,
    }


def render() -> str:
    return json.dumps(namespace(), indent=4) + '\n'


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog='python -m mftvm_openstack.nova.metadefs',
        description='Write the Glance metadefs namespace of the ft: flavor '
                    'extra specs.')
    parser.add_argument('-o', '--output', help='file to write (default: '
                        'standard output)')
    parser.add_argument('--check', metavar='FILE',
                        help='exit 1 unless FILE is what would be written')
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        with open(args.check) as f:
            if f.read() != text:
                print(f'{args.check} is stale: regenerate it with '
                      f'python -m mftvm_openstack.nova.metadefs -o '
                      f'{args.check}', file=sys.stderr)
                return 1
        return 0
    if args.output:
        with open(args.output, 'w') as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
