"""The FT API: fault-tolerant servers' live state behind Keystone.

A small WSGI service (``mftvm-api``, or ``mftvm-api-wsgi`` under a WSGI
server) in the manner of Masakari's API: keystonemiddleware checks the
token, oslo.policy decides (:mod:`.policy`), Nova says which servers a
project has and where they run (:mod:`.inventory`), the agents say how
each is protected (:mod:`.service`), and :mod:`.app` routes, checks the
input and answers the contract's records
(:mod:`mftvm_openstack.contract.ftapi`)::

    $ curl -H "X-Auth-Token: $TOKEN" http://ctl:8790/v1/servers
    {"servers": [{"id": "0b6c...", "protection": "protected", ...}]}

doc/api.rst is the reference.
"""
