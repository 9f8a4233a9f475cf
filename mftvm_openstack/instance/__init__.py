"""The instance process: one side (primary or secondary) of one guest.

The local CLI (:mod:`mftvm_openstack.local`) and the agent
(:mod:`mftvm_openstack.agent`) start one such process per guest side, as
``python -m mftvm_openstack.instance ROLE GUEST_DIR``; it outlives whoever
started it. :mod:`.client` is how others talk to it.
"""
