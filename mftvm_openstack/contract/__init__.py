"""The contract: every value that crosses a process boundary, defined once.

Four kinds of process talk about protected guests: the instance process
(one side of one guest), the agent (one per hypervisor), the ``mftvm`` CLI
and Nova's compute driver. They share no memory; what they say to each
other is defined here, typed, and checked on the way in:

* :mod:`.states` — the states and roles of a guest's side (the only
  spelling of them anywhere);
* :mod:`.limits` — the ranges of the settings a caller may choose;
* :mod:`.plugins` — the names of the tracker and disk-sync plugins, read
  from their entry points;
* :mod:`.record` — the typed, checked records the rest are made of;
* :mod:`.status` — what one side says about itself (``status.json``, the
  control socket, the agent's ``status`` RPC);
* :mod:`.spec` — the agent's RPC payloads: the guest spec (what QEMU
  runs: every field checked, since it reaches a command line run as
  root), the protection options, a failover's answer;
* :mod:`.options` — what an instance process is told in ``guest.json``
  besides the spec: how the guest is protected, and its host's bounds;
* :mod:`.control` — the instance process's control requests and replies;
* :mod:`.hello` — the handshake of a pair's data stream, with its
  protocol version;
* :mod:`.notifications` — the agents' versioned notifications: event
  types and payloads.

Nothing here imports the engine, numpy, stevedore or QEMU's libraries:
nova-api imports it (through the flavor validators) and must stay light.
"""
