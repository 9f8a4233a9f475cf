"""What an instance process is told, and what it finds out about its host.

``DIR/guest.json`` holds the guest's spec and its protection options;
:data:`HOST_DEFAULTS` fills in what only the instance process reads::

    spec, options = load_guest('/var/lib/mftvm/vm0')
    options['detect_timeout']          # 1.0 unless guest.json says

Secrets are not in guest.json (any file may end up in a backup or a bug
report): the fencing URL with its password comes in the environment
variable :data:`FENCE_URL_ENV` (``/proc/PID/environ`` is its owner's
only); guest.json keeps it masked, for people to read.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from mftvm_openstack.files import private_dir
from mftvm_openstack.ft import vm

#: the environment variable that holds the fencing backend's URL, with
#: its password (guest.json's ``fence_url`` has it masked)
FENCE_URL_ENV = 'MFTVM_FENCE_URL'

#: defaults of guest.json "options" that only the instance process reads
HOST_DEFAULTS: dict[str, Any] = {
    'listen': None,          # secondary: data address (default: unix)
    'secondary': None,       # primary: where its secondary listens
    'nbd_host': None,        # secondary: serve the disk over TCP here
    'pair_id': 'pair-1',
    'fence_url': None,       # tooz URL (masked; see FENCE_URL_ENV);
                             # None: a lock file in guest_dir
    'fence_dir': None,       # where the lock file lives (default guest_dir)
    'fence_lease': 3,
    'fence_acquire_timeout': 10.0,
    'member': None,          # this host's name at the coordination backend
    'ram_tag': None,         # tells RAM files of one guest apart per host
    'heartbeat_interval': 0.2,
    'detect_timeout': 1.0,
    'ack_timeout': 10.0,     # a shipped epoch unacked this long: lost
    'max_held_epochs': 50,   # output held over more unacked epochs, or
    'max_held_bytes': 32 << 20,   # more bytes: the guest pauses
    'adaptive_epochs': True,  # an epoch ends soon after the first packet:
    'output_batch_ms': 2,     # this long after it, at least
    'min_epoch_ms': 10,       # after the last checkpoint began, and with
    'max_pause_percent': 25,  # a busy guest paused at most this share
    'hang_timeout': 15.0,    # QEMU silent on QMP this long counts as dead
    'replica_timeout': 3.0,  # disk replica silent this long is cut off
    'libvirt_uri': 'qemu:///system',   # for a guest run by libvirt
    'domain_name': None,     # secondary: its restored domain's name
    'tls': True,             # mutual TLS on the data stream and NBD,
                             # with the creds in tls_dir(); off only on
                             # a dedicated, trusted replication network
}


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


def load_guest(guest_dir: str) -> tuple[vm.GuestSpec, dict[str, Any]]:
    """The spec and the options (defaults filled in) of ``guest_dir``."""
    with open(os.path.join(guest_dir, 'guest.json')) as f:
        data = json.load(f)
    options = {**HOST_DEFAULTS, **data['options']}
    secret_url = os.environ.get(FENCE_URL_ENV)
    if secret_url:
        options['fence_url'] = secret_url
    return vm.GuestSpec.from_json(data['spec']), options


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
