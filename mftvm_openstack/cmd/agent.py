"""``mftvm-agent``: the fault-tolerance agent of one hypervisor.

::

    mftvm-agent [--config-file /etc/mftvm/mftvm.conf] [--debug]

A minimal configuration::

    [DEFAULT]
    transport_url = rabbit://mftvm:PASSWORD@10.0.0.5:5672/

    [agent]
    host = hv1
    state_path = /var/lib/mftvm

The agent checks that the broker takes messages before it starts serving;
a missing or malformed ``transport_url`` or an unreachable broker ends it
with one line on stderr and exit code 1 (the password is never shown).
It then asks its fencing store (``[fencing] backend_url``) one read and
logs the answer: ``fencing store etcd3+http://10.0.0.5:2379 answers``,
or an error that says guests cannot change hands until it does (the
agent serves all the same: the store may come back before it is
needed).
SIGTERM or SIGINT stops it (exit 0); SIGHUP reloads the mutable options.
``/etc/mftvm/mftvm.conf`` is read when no ``--config-file`` is given and
it exists.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

# before any oslo import (threading_backend says why)
from mftvm_openstack.cmd import threading_backend

threading_backend.select()

from oslo_config import cfg  # noqa: E402
from oslo_log import log as logging  # noqa: E402

from mftvm_openstack import conf as mftvm_conf  # noqa: E402

CONF = mftvm_conf.CONF
LOG = logging.getLogger(__name__)

DEFAULT_CONFIG_FILE = '/etc/mftvm/mftvm.conf'


def _fail(message: str) -> int:
    print(f'mftvm-agent: error: {message}', file=sys.stderr)
    return 1


def check_fencing(conf: cfg.ConfigOpts) -> bool:
    """Log whether the fencing store answers; True if it does (or there
    is none: lock files)."""
    from mftvm_openstack import fencing

    url = conf.fencing.backend_url
    if not url:
        LOG.info('fencing with lock files in %s (both sides of a pair on '
                 'this machine only)', conf.fencing.lock_path)
        return True
    try:
        fencing.check_store(url, member=conf.agent.host)
    except (fencing.FenceError, ValueError) as exc:
        LOG.error('fencing store %s does not answer: %s; no guest can '
                  'start or fail over here until it does',
                  fencing.mask_url(url), fencing.mask_url(str(exc)))
        return False
    LOG.info('fencing store %s answers', fencing.mask_url(url))
    return True


def main(argv: Optional[list[str]] = None) -> int:
    from mftvm_openstack.agent import exception, rpcapi, service

    args = sys.argv[1:] if argv is None else argv
    logging.register_options(CONF)
    defaults = ([DEFAULT_CONFIG_FILE]
                if os.path.exists(DEFAULT_CONFIG_FILE) else [])
    try:
        CONF(args, project='mftvm', prog='mftvm-agent',
             default_config_files=defaults)
    except cfg.Error as exc:
        return _fail(rpcapi.mask_url(str(exc).splitlines()[0]))
    logging.setup(CONF, 'mftvm')

    # transport_url is registered by oslo.messaging; ask for it by name
    transport = None
    try:
        transport_url = rpcapi.configured_transport_url(CONF)
        if not transport_url:
            return _fail('no transport_url in [DEFAULT]: set it to the '
                         'RabbitMQ URL, e.g. '
                         'rabbit://USER:PASSWORD@HOST:5672/')
        transport = rpcapi.get_transport(CONF)
        rpcapi.check_transport(transport, CONF)
    except exception.MftvmError as exc:
        return _fail(str(exc))
    finally:
        if transport is not None:
            transport.cleanup()

    LOG.info('mftvm-agent %s starting (broker %s)', CONF.agent.host,
             rpcapi.mask_url(transport_url))
    check_fencing(CONF)
    svc = service.AgentService(CONF)
    try:
        return service.serve(svc, CONF)
    except exception.MftvmError as exc:
        LOG.error('mftvm-agent could not start: %s', exc)
        return _fail(str(exc))
    except Exception as exc:
        LOG.exception('mftvm-agent could not start')
        return _fail(f'could not start: {type(exc).__name__}: '
                     f'{rpcapi.mask_url(str(exc).splitlines()[0])}')


if __name__ == '__main__':
    sys.exit(main())
