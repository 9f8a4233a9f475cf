"""What an instance process is told, and what it finds out about its host.

``DIR/guest.json`` holds the guest's spec and its options, both checked
as they are read (:class:`~mftvm_openstack.contract.options.HostOptions`
says each option's type, range and default)::

    spec, options = load_guest('/var/lib/mftvm/vm0')
    options.detect_timeout             # 1.0 unless guest.json says

Secrets are not in guest.json (any file may end up in a backup or a bug
report): the fencing URL with its password comes in the environment
variable :data:`FENCE_URL_ENV` (``/proc/PID/environ`` is its owner's
only); guest.json keeps it masked, for people to read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket

from mftvm_openstack.contract.options import HostOptions
from mftvm_openstack.files import private_dir
from mftvm_openstack.ft import vm

LOG = logging.getLogger(__name__)

#: the environment variable that holds the fencing backend's URL, with
#: its password (guest.json's ``fence_url`` has it masked)
FENCE_URL_ENV = 'MFTVM_FENCE_URL'

def tls_dir(guest_dir: str, role: str) -> str:
    """Where a side's pair credentials are (see ft.pair_tls): the
    secondary's server creds, the primary's client creds. Written before
    the side needs them, by the agent (from prepare_secondary) or by the
    CLI; never sent on the data stream."""
    return os.path.join(guest_dir, 'tls',
                        'server' if role == 'secondary' else 'client')


def new_tls_dir(guest_dir: str, role: str) -> str:
    """:func:`tls_dir`, its parent made 0700 (the creds writer makes the
    directory itself 0700; a parent made on the way would take the
    umask)."""
    path = tls_dir(guest_dir, role)
    private_dir(os.path.dirname(path))
    return path


def load_guest(guest_dir: str) -> tuple[vm.GuestSpec, HostOptions]:
    """The spec and the options (defaults filled in) of ``guest_dir``,
    each checked (ContractError names the field that does not fit)."""
    with open(os.path.join(guest_dir, 'guest.json')) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        data = {}
    options, before_tls = HostOptions.load(data.get('options', {}))
    if before_tls:
        LOG.warning('%s was written before pair TLS (its guest.json has '
                    'no "tls" option): taken as tls on, never as a plain '
                    'stream; without pair credentials in its tls/ it is '
                    'not protected until it is protected again', guest_dir)
    secret_url = os.environ.get(FENCE_URL_ENV)
    if secret_url:
        options = dataclasses.replace(options, fence_url=secret_url)
    return vm.GuestSpec.from_json(data.get('spec')), options


def boot_id() -> str:
    """This machine's boot id: tells whether a peer runs on it too."""
    with open('/proc/sys/kernel/random/boot_id') as f:
        return f.read().strip()


def free_port(host: str) -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port
