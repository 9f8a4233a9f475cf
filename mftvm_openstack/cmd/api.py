"""``mftvm-api``: the FT API on a small threaded HTTP server.

::

    mftvm-api [--config-file /etc/mftvm/mftvm-api.conf] [--debug]

For production run the WSGI entry point ``mftvm-api-wsgi``
(:func:`mftvm_openstack.api.app.init_application`) under uWSGI or
mod_wsgi instead. A minimal configuration::

    [DEFAULT]
    transport_url = rabbit://mftvm:PASSWORD@10.0.0.5:5672/

    [ft_api]
    bind_host = 10.0.0.5
    bind_port = 8790

    [keystone_authtoken]
    www_authenticate_uri = http://10.0.0.5/identity
    auth_url = http://10.0.0.5/identity
    auth_type = password
    username = mftvm
    password = PASSWORD
    project_name = service
    user_domain_name = Default
    project_domain_name = Default

    [nova]
    auth_url = http://10.0.0.5/identity
    auth_type = password
    (the same service user, who needs the admin role on Nova)

A bad option or a port in use ends it with one line on stderr and exit
code 1. SIGTERM or SIGINT stops it (exit 0).
"""

from __future__ import annotations

import os
import signal
import socketserver
import sys
import threading
from typing import Any, Optional
from wsgiref import simple_server

# before any oslo import (threading_backend says why)
from mftvm_openstack.cmd import threading_backend

threading_backend.select()

from oslo_config import cfg  # noqa: E402
from oslo_log import log as logging  # noqa: E402

from mftvm_openstack import conf as mftvm_conf  # noqa: E402

CONF = mftvm_conf.CONF
LOG = logging.getLogger(__name__)

DEFAULT_CONFIG_FILE = '/etc/mftvm/mftvm-api.conf'


class _Server(socketserver.ThreadingMixIn, simple_server.WSGIServer):
    daemon_threads = True


class _Handler(simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        LOG.info('%s %s', self.address_string(), format % args)


def _fail(message: str) -> int:
    print(f'mftvm-api: error: {message}', file=sys.stderr)
    return 1


def serve(app: Any, host: str, port: int) -> _Server:
    """A server of ``app`` on ``host``:``port`` (0: any free port),
    not yet serving: call its ``serve_forever``."""
    return simple_server.make_server(host, port, app, server_class=_Server,
                                     handler_class=_Handler)


def main(argv: Optional[list[str]] = None) -> int:
    from mftvm_openstack.agent import rpcapi
    from mftvm_openstack.api import app as api_app
    from mftvm_openstack.api import conf as api_conf

    args = sys.argv[1:] if argv is None else argv
    logging.register_options(CONF)
    api_conf.register_opts(CONF)
    defaults = ([DEFAULT_CONFIG_FILE]
                if os.path.exists(DEFAULT_CONFIG_FILE) else [])
    try:
        CONF(args, project='mftvm', prog='mftvm-api',
             default_config_files=defaults)
    except cfg.Error as exc:
        return _fail(rpcapi.mask_url(str(exc).splitlines()[0]))
    logging.setup(CONF, 'mftvm')
    try:
        app = api_app.build_app(CONF)
        server = serve(app, CONF.ft_api.bind_host, CONF.ft_api.bind_port)
    except OSError as exc:
        return _fail(f'cannot listen on {CONF.ft_api.bind_host}:'
                     f'{CONF.ft_api.bind_port}: {exc.strerror}')
    except Exception as exc:
        LOG.exception('mftvm-api could not start')
        return _fail(f'could not start: {type(exc).__name__}: '
                     f'{rpcapi.mask_url(str(exc).splitlines()[0])}')

    def stop(signum: int, frame: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    host, port = server.server_address[:2]
    LOG.info('mftvm-api listening on %s:%s', host, port)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


if __name__ == '__main__':
    sys.exit(main())
