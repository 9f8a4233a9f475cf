"""oslo.service's threading backend, chosen before any oslo import.

oslo.messaging imports ``oslo_service.service``, which fixes oslo.service's
backend (eventlet, by default) the first time it is used; the commands
run on threads. So a command selects the backend first, ahead of every
other oslo import::

    from mftvm_openstack.cmd import threading_backend

    threading_backend.select()

    from oslo_config import cfg  # noqa: E402

This module imports nothing of oslo itself until :func:`select` runs
(``mftvm_openstack`` and ``mftvm_openstack.cmd`` import nothing either).
"""

from __future__ import annotations

import warnings


def select() -> None:
    """The threading backend, unless a backend was chosen already (a
    test harness, or a host process that chose its own)."""
    # eventlet (installed for oslo.service's other backend, imported by
    # futurist) warns on import; these commands do not use it
    warnings.filterwarnings('ignore', message=r'\s*Eventlet is deprecated')
    from oslo_service import backend

    if backend.get_backend_type() is None:
        backend.init_backend(backend.BackendType.THREADING)
