"""The FT API's options: ``[ft_api]`` and the service user in ``[nova]``.

They are registered on the ConfigOpts the service is built with, not on
import (nova-compute and the agent import this package's siblings and
must not grow these groups)::

    conf = cfg.ConfigOpts()
    register_opts(conf)
    conf(['--config-file', '/etc/mftvm/mftvm-api.conf'], project='mftvm')
    conf.ft_api.max_servers        # 1000

``oslo-config-generator --namespace mftvm.api`` documents them (see
``etc/mftvm/mftvm-api-config-generator.conf``).
"""

from __future__ import annotations

import copy

from keystoneauth1 import loading as ks_loading
from oslo_config import cfg

API_GROUP = 'ft_api'
NOVA_GROUP = 'nova'

api_opts = [
    cfg.HostAddressOpt(
        'bind_host', default='0.0.0.0',
        help='Address the mftvm-api console script listens on (under a '
             'WSGI server such as uWSGI, the server\'s own setting '
             'applies instead).'),
    cfg.PortOpt(
        'bind_port', default=8790,
        help='Port the mftvm-api console script listens on.'),
    cfg.IntOpt(
        'max_request_body_bytes', default=16384, min=64, max=1 << 20,
        help='Largest request body accepted; a longer one is refused '
             'with 413 before it is read. The API\'s bodies are a few '
             'dozen bytes.'),
    cfg.IntOpt(
        'max_servers', default=1000, min=1, max=10000,
        help='Most servers one GET /v1/servers asks Nova for and shows '
             '(the limit query parameter may ask for fewer).'),
    cfg.IntOpt(
        'max_hosts', default=200, min=1, max=10000,
        help='Most compute hosts whose agents one listing asks; the '
             'servers of further hosts are shown with protection '
             '"unknown".'),
    cfg.FloatOpt(
        'agent_timeout', default=10.0, min=0.5, max=600,
        help='Seconds the API waits for an agent to answer status or '
             'list over RPC.'),
    cfg.FloatOpt(
        'action_timeout', default=120.0, min=1, max=3600,
        help='Seconds the API waits for an agent to carry out failover '
             'or reprotect.'),
]


def _nova_opts() -> list[cfg.Opt]:
    opts = [copy.deepcopy(o) for o in (
        ks_loading.get_session_conf_options()
        + ks_loading.get_auth_common_conf_options()
        + ks_loading.get_auth_plugin_conf_options('password'))]
    adapter = ks_loading.get_adapter_conf_options(include_deprecated=False)
    for opt in adapter:
        if opt.dest == 'service_type':
            opt = copy.deepcopy(opt)
            opt.default = 'compute'
        opts.append(opt)
    return opts


def register_opts(conf: cfg.ConfigOpts) -> None:
    conf.register_opts(api_opts, group=API_GROUP)
    ks_loading.register_session_conf_options(conf, NOVA_GROUP)
    ks_loading.register_auth_conf_options(conf, NOVA_GROUP)
    ks_loading.register_adapter_conf_options(conf, NOVA_GROUP,
                                             include_deprecated=False)
    conf.set_default('service_type', 'compute', group=NOVA_GROUP)


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """For oslo-config-generator (entry point ``oslo.config.opts``,
    namespace ``mftvm.api``)."""
    return [(API_GROUP, list(api_opts)), (NOVA_GROUP, _nova_opts())]
