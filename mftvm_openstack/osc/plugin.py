"""The ``ft`` plugin of the ``openstack`` CLI (entry point group
``openstack.cli.extension``, name ``ft``).

OSC loads the module the entry point names and calls :func:`make_client`
the first time a command uses ``self.app.client_manager.ft``::

    client = make_client(instance)      # instance: OSC's ClientManager
    client.list_servers()               # (FTServer, ...)

The API is found in the Keystone catalog as service type
:data:`SERVICE_TYPE`, on the interface and region the CLI was given
(``--os-interface``, ``--os-region-name``); ``--os-ft-api-version``
selects the API version (only ``1``).
"""

from __future__ import annotations

from typing import Any

from mftvm_openstack.osc.client import SERVICE_TYPE, FTClient

API_NAME = 'ft'
API_VERSION_OPTION = 'os_ft_api_version'
DEFAULT_API_VERSION = '1'
API_VERSIONS = {'1': 'mftvm_openstack.osc.client.FTClient'}

__all__ = ['API_NAME', 'API_VERSIONS', 'API_VERSION_OPTION',
           'SERVICE_TYPE', 'build_option_parser', 'make_client']


def make_client(instance: Any) -> FTClient:
    from keystoneauth1 import adapter

    version = instance._api_version.get(API_NAME, DEFAULT_API_VERSION)
    if version not in API_VERSIONS:
        from osc_lib import exceptions
        raise exceptions.UnsupportedVersion(
            f'FT API version {version} is not supported (versions: '
            f'{", ".join(API_VERSIONS)})')
    return FTClient(adapter.Adapter(
        session=instance.session, service_type=SERVICE_TYPE,
        interface=instance.interface, region_name=instance.region_name))


def build_option_parser(parser: Any) -> Any:
    """Adds ``--os-ft-api-version`` to the ``openstack`` CLI."""
    from osc_lib import utils

    parser.add_argument(
        '--os-ft-api-version', metavar='<ft-api-version>',
        default=utils.env('OS_FT_API_VERSION'),
        help=f'FT API version, default={DEFAULT_API_VERSION} '
             f'(Env: OS_FT_API_VERSION)')
    return parser
