"""Protected guests on this one machine, without OpenStack.

What ``mftvm protect``, ``status``, ``failover``, ``stop`` and ``demo``
do (:mod:`.operations`, :mod:`.demo`): both sides run as instance
processes on this machine, fenced by a lock file.
"""
