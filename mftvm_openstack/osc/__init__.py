"""``openstack ft ...``: the FT API's plugin for the ``openstack`` CLI.

::

    openstack ft server list [--all-projects | --project ID] [--long]
    openstack ft server show SERVER
    openstack ft server failover SERVER
    openstack ft server reprotect SERVER [--secondary-host HOST]

:mod:`.plugin` is the module the ``openstack.cli.extension`` entry point
names; :mod:`.client` speaks to the FT API, found in the Keystone catalog
as service type ``fault-tolerance``; :mod:`.v1.server` holds the commands
(OSC's Lister and ShowOne, so ``-f json`` and ``-c`` work).
"""
