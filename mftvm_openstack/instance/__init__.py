"""The instance process: one side (primary or secondary) of one guest.

The local CLI (:mod:`mftvm_openstack.local`) and the agent
(:mod:`mftvm_openstack.agent`) start one such process per guest side, as
``python -m mftvm_openstack.instance ROLE GUEST_DIR``; it outlives whoever
started it. Its parts:

* :mod:`.main` — the command line; runs a :mod:`.primary` or a
  :mod:`.secondary` side;
* :mod:`.side` — what both share: the side's state machine
  (:mod:`mftvm_openstack.ft.pair`, the only holder of its state), the
  control commands, the status, the guest's exit and hang watches;
* :mod:`.primary` / :mod:`.secondary` — how the guest comes to run on
  each (boot or adopt; restore after a takeover);
* :mod:`.protection` — the primary machine's link to a secondary (HELLO,
  relay, disk sync, capture, output commit, stale replica);
* :mod:`.guest` — the running guest, booted or found in libvirt;
* :mod:`.control` — the control socket server (contract records);
* :mod:`.status` — the status publisher (``status.json``);
* :mod:`.lease` — the lease keeper (renewal, self-fencing);
* :mod:`.watchdog` — the QEMU hang watchdog;
* :mod:`.config` — ``guest.json`` and its defaults;
* :mod:`.client` — how others talk to a running instance process.
"""
