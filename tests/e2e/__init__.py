"""End-to-end tier: a real OpenStack, driven only by the ``openstack`` CLI.

The tier brings up the cloud lab (``tools/cloud/cloudlab.py``: MariaDB,
RabbitMQ, Keystone, Glance, Placement, Neutron, Nova's API, conductors
and scheduler, etcd, in a network namespace, and compute hosts with
nova-compute and mftvm-agent) once per test process, shared by every
module (:mod:`tests.e2e.lab`; a new module subclasses
``lab.LabTestCase``), and talks to it the way a user does: ``openstack``
commands in subprocesses, nothing imported from the services.  It needs
root and ``.cloud-venv`` (``tools/run.sh test`` makes it);
``.stestr.conf`` keeps the tier's tests in one worker, so the lab is
started once for all of them and torn down when that worker exits.
"""
