"""End-to-end tier: a real OpenStack, driven only by the ``openstack`` CLI.

The tier brings up the cloud lab (``tools/cloud/cloudlab.py``: MariaDB,
RabbitMQ, Keystone, Glance, Placement, Nova's API, conductors and
scheduler, in a network namespace) once, and talks to it the way a user
does: ``openstack`` commands in subprocesses, nothing imported from the
services.  It needs root and ``.cloud-venv`` (``tools/run.sh test`` makes
it); ``.stestr.conf`` keeps the tier's tests in one worker, so the
control plane is started once for all of them.
"""
