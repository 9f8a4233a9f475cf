"""Cinder volumes of FT servers (doc/volumes.rst).

``connection``: what Cinder answers for an RBD volume on a host, checked
and typed (:class:`~mftvm_openstack.cinder.connection.RbdVolume`).
``handover``: a volume's attachment moved to the host that took a
server over, through Cinder's attachment API as Nova's live migration
does (:class:`~mftvm_openstack.cinder.handover.AttachmentHandover`).
Neither imports Nova or Cinder: they are given Nova's volume API.
"""
