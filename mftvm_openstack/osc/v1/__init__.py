"""The ``openstack ft`` commands of the FT API's version 1."""
