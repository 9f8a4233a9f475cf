"""The agent's options, registered with oslo.config.

Every option lives here, with its help text, so that
``oslo-config-generator --config-file etc/mftvm/mftvm-config-generator.conf``
writes the whole reference (``etc/mftvm/mftvm.conf.sample``)::

    from mftvm_openstack import conf
    CONF = conf.CONF                 # registered on import
    CONF(['--config-file', '/etc/mftvm/mftvm.conf'], project='mftvm')
    CONF.agent.heartbeat_interval    # 0.2

``[DEFAULT] transport_url`` and the RabbitMQ options belong to
oslo.messaging and are listed by its own ``oslo.messaging`` namespace.
Nothing of ours lives in ``[DEFAULT]``: Nova's compute driver imports
this module into nova-compute, whose ``[DEFAULT] host`` and
``state_path`` mean Nova's own.
"""

from __future__ import annotations

import socket

from oslo_config import cfg, types

from mftvm_openstack.contract import plugins
from mftvm_openstack.contract.limits import (
    EPOCH_MS_RANGE,
    IDLE_EPOCH_MS_RANGE,
    MIN_EPOCH_MS_RANGE,
    OUTPUT_BATCH_MS_RANGE,
    PAUSE_PERCENT_RANGE,
)
from mftvm_openstack.contract.options import (
    BRIDGE_GLOB_PATTERN,
    DEFAULT_ALLOWED_BRIDGES,
)

CONF = cfg.CONF

agent_opts = [
    cfg.StrOpt('host', default=socket.gethostname(),
               sample_default='<hostname>',
               help='Name of this hypervisor. Agents find each other by it '
                    '(it is the RPC server name on topic mftvm-agent), so '
                    'it must match the name Nova uses for this compute '
                    'host (nova.conf [DEFAULT] host).'),
    cfg.StrOpt('state_path', default='/var/lib/mftvm',
               help='Where the agent keeps its per-instance state: the '
                    'guest spec, the role of this host, and the sockets, '
                    'logs and replica files of the instance processes.'),
    cfg.HostAddressOpt(
        'my_ip', default='127.0.0.1',
        help='Address of this host on the network that carries the '
             'checkpoint stream and the disk replica (NBD). Peers connect '
             'to it, so set it to an address they can reach.'),
    cfg.StrOpt(
        'libvirt_uri', default='qemu:///system',
        help='Libvirt connection of this host, for guests that run as '
             'libvirt domains (Nova\'s FT instances): the agent adopts a '
             'running domain through it, and a failover restores the '
             'guest as a domain through it. It must be local: the agent '
             'reads guest RAM from the domain\'s shared memory file.'),
    cfg.ListOpt(
        'disk_dirs', default=['/var/lib/mftvm/disks'],
        help='Where the disk of a guest that is not a libvirt domain (a '
             'protect call that names kernel, initrd and disk rather than '
             'a domain) may be. A disk elsewhere, a symbolic link, or '
             'anything but a regular file is refused: the agent runs as '
             'root and streams the disk to a peer. Keep these '
             'directories writable by root only.'),
    cfg.ListOpt(
        'allowed_bridges', default=list(DEFAULT_ALLOWED_BRIDGES),
        item_type=types.String(regex=rf'\A({BRIDGE_GLOB_PATTERN})\Z'),
        help='The host bridges a protected libvirt guest\'s NICs may be '
             'on (names, with * and ? as wildcards). A secondary '
             'restores a guest from the domain XML its primary sends; a '
             'NIC on any other bridge (a management or storage network, '
             'say) refuses the restore, and the primary refuses to '
             'protect such a guest. The default covers Neutron\'s '
             'Open vSwitch and OVN integration bridge, the Linux bridge '
             'agent\'s brq bridges and libvirt\'s default network.'),
    cfg.ListOpt(
        'peers', default=[],
        help='Hosts that may serve as secondaries for the guests of this '
             'host, in order of preference (standalone deployments; with '
             'Nova, its compute driver chooses through Placement). Used to '
             're-protect a guest after a failover or after its secondary '
             'was lost.'),
    cfg.BoolOpt(
        'reprotect', default=True,
        help='Re-protect a guest automatically, onto a peer, once its '
             'secondary is lost or it has failed over here.'),
    cfg.FloatOpt(
        'reprotect_retry_interval', default=5.0, min=0.5,
        help='Seconds between attempts to re-protect a guest when no peer '
             'could take it.'),
    cfg.FloatOpt(
        'heartbeat_interval', default=0.2, min=0.05,
        help='Seconds between heartbeats on the data stream of a pair.'),
    cfg.IntOpt(
        'heartbeat_misses', default=4, min=2,
        help='Missed heartbeats after which a secondary declares its '
             'primary lost. Detection takes heartbeat_interval * '
             'heartbeat_misses (0.8 s by default).'),
    cfg.FloatOpt(
        'hang_timeout', default=15.0, min=1,
        help='Seconds a guest\'s QEMU may leave its monitor unanswered '
             'before it counts as hung: it is killed, and its secondary '
             'takes over.'),
    cfg.FloatOpt(
        'replica_timeout', default=3.0, min=0.5,
        help='Seconds the secondary\'s disk replica may leave a request '
             'unanswered before the primary cuts it off and carries on '
             'unprotected (QEMU alone would freeze the guest waiting).'),
    cfg.FloatOpt(
        'monitor_interval', default=0.5, min=0.1,
        help='Seconds between the agent\'s checks of its instance '
             'processes (a QEMU that exits, a failover that completed).'),
    cfg.FloatOpt(
        'protect_timeout', default=300.0, min=10,
        help='Seconds a protect call may take, initial disk sync '
             'included, before it is given up.'),
]

fencing_opts = [
    cfg.StrOpt(
        'backend_url', secret=True,
        help='The store that arbitrates who runs each guest. In '
             'production an etcd cluster (a consensus decision), e.g. '
             'etcd3+http://10.0.0.5:2379?endpoints=10.0.0.6:2379,'
             '10.0.0.7:2379; a Redis URL (redis://10.0.0.5:6379, through '
             'tooz) serves one node and tests: one Redis is one '
             'machine\'s word. Without it, a lock file in lock_path '
             'fences, which only works while both sides of a pair share '
             'one machine. See doc/fencing.rst.'),
    cfg.StrOpt(
        'lock_path', default='/run/mftvm/fence',
        help='Without backend_url: the directory of the lock files that '
             'fence guests. Every agent on one machine must use the same '
             'one.'),
    cfg.IntOpt(
        'lease', default=3, min=1,
        help='Seconds an ownership lease lasts without renewal. A primary '
             'that cannot renew its lease stops its guest itself before '
             'the lease runs out; a secondary takes over only after it '
             'won the lease. Failover after the loss of a whole host '
             'therefore takes at least the rest of the lease.'),
    cfg.FloatOpt(
        'acquire_timeout', default=10.0, min=1,
        help='Seconds a secondary tries to win ownership before it gives '
             'up and leaves the guest to its primary.'),
]

ft_opts = [
    cfg.IntOpt('epoch_ms', default=200, min=EPOCH_MS_RANGE[0],
               max=EPOCH_MS_RANGE[1],
               help='Longest epoch (checkpoint interval), in milliseconds, '
                    'while the guest sends packets: they are held until '
                    'their epoch commits, so this bounds the latency '
                    'protection adds. With adaptive_epochs (the default) '
                    'such an epoch usually ends much sooner, '
                    'output_batch_ms after its first packet; without, it '
                    'lasts this long.'),
    cfg.BoolOpt('adaptive_epochs', default=True,
                help='End an epoch soon after the guest\'s first packet in '
                     'it (output_batch_ms later, or once the guest\'s QEMU '
                     'goes quiet if it is still busy then, waiting up to '
                     'a pause), no sooner than '
                     'min_epoch_ms after the last checkpoint began, and '
                     'never so often that the guest spends more than '
                     'max_pause_percent of its time paused; an epoch '
                     'without packets runs on to idle_epoch_ms. Off: an '
                     'epoch that holds packets lasts epoch_ms.'),
    cfg.IntOpt('output_batch_ms', default=2,
               min=OUTPUT_BATCH_MS_RANGE[0], max=OUTPUT_BATCH_MS_RANGE[1],
               help='adaptive_epochs: how long after the guest\'s first '
                    'packet of an epoch the epoch ends, so that the rest '
                    'of a reply, and other clients\' packets, share its '
                    'commit; a guest whose QEMU is still busy then (it '
                    'computes, or flushes a disk write, an answer still '
                    'to come) is waited for until it is quiet, up to as '
                    'long as a pause takes. Each packet waits this, plus '
                    'the checkpoint pause and the round trip to the '
                    'secondary.'),
    cfg.IntOpt('min_epoch_ms', default=10,
               min=MIN_EPOCH_MS_RANGE[0], max=MIN_EPOCH_MS_RANGE[1],
               help='adaptive_epochs: shortest epoch, from one '
                    'checkpoint\'s start to the next\'s (at most '
                    '1000/min_epoch_ms checkpoints a second).'),
    cfg.IntOpt('max_pause_percent', default=25,
               min=PAUSE_PERCENT_RANGE[0], max=PAUSE_PERCENT_RANGE[1],
               help='adaptive_epochs: most of the time it wants to run, '
                    'in percent, a guest loses to checkpoint pauses: the '
                    'next checkpoint waits until this share of the time '
                    'since covers what the last pauses cost (a second\'s '
                    'share may be saved up for a burst). A pause costs '
                    'what the guest would have run meanwhile, judged by '
                    'its QEMU\'s CPU time: nothing for a guest waiting '
                    'for its clients, all of it for a busy one. Pauses '
                    'grow with the memory the guest dirties, so a busy '
                    'guest that dirties more gets longer epochs. Never '
                    'stretches an epoch past epoch_ms.'),
    cfg.IntOpt('idle_epoch_ms', default=1000, min=IDLE_EPOCH_MS_RANGE[0],
               max=IDLE_EPOCH_MS_RANGE[1],
               help='Longest epoch, in milliseconds, while the guest sends '
                    'no packets: no client waits on such an epoch, so it '
                    'runs on (fewer checkpoint pauses) until the guest '
                    'sends or this much time has passed. Never shorter '
                    'than epoch_ms; 0 makes every epoch epoch_ms long. '
                    'Longer idle epochs leave the secondary further '
                    'behind, which a failover never shows to clients (the '
                    'guest redoes the unseen work).'),
    cfg.StrOpt('disk_sync', default=plugins.DEFAULT_DISK_SYNC,
               choices=list(plugins.disk_sync_choices()),
               help='How the disk reaches the secondary. async-replication '
                    '(default): every write travels to the replica as it '
                    'happens, without the guest waiting for it; each '
                    'checkpoint waits for the last few. write-replication: '
                    'each write completes only once the replica has it '
                    '(every sync write pays a round trip). block-copy: the '
                    'blocks of each epoch are copied inside its checkpoint '
                    '(the MFTVM 3 baseline, for comparison).'),
    cfg.StrOpt('tracker', default=plugins.AUTO_TRACKER,
               choices=list(plugins.tracker_choices()),
               help='How dirty guest memory is found; auto picks '
                    'soft-dirty when the kernel supports it, else hash '
                    '(per-page hashes, 0.5% of RAM), else scan (a full '
                    'copy of RAM).'),
    cfg.FloatOpt(
        'ack_timeout', default=10.0, min=0.5,
        help='Seconds a checkpoint, once shipped, may wait for the '
             'secondary\'s ack. A later ack makes the secondary lost: the '
             'guest goes on unprotected (its replica marked stale before '
             'the held output leaves), rather than a secondary that reads '
             'but never acks holding the guest\'s network back.'),
    cfg.IntOpt(
        'max_held_epochs', default=50, min=1,
        help='Most epochs whose output the primary holds unacked. At the '
             'bound the guest is paused (its packets neither dropped nor '
             'sent early) until acks free room; its status then says '
             'held_output_full.'),
    cfg.IntOpt(
        'max_held_bytes', default=32 << 20, min=1 << 16,
        help='Most bytes of guest output held for commit, per guest. At '
             'the bound the guest is paused, as with max_held_epochs; '
             'frames it sent while being paused are still held, so the '
             'buffer may exceed this by a few frames.'),
    cfg.FloatOpt(
        'handoff_interval', default=2.0, min=0,
        help='nova-compute (FTLibvirtDriver) only: seconds between two '
             'looks at the local agent for servers it took over from a '
             'failed host, whose Nova record then moves here, and for '
             'servers of this host whose secondary was lost (their '
             'ft_status, kept true at each look, and their secondary\'s '
             'Placement allocation, released). 0 turns both off.'),
    cfg.BoolOpt(
        'nic_checksum_offload', default=True,
        help='nova-compute (FTLibvirtDriver) only: leave the TCP/UDP '
             'checksums of a guest\'s virtio NIC to the host, as QEMU '
             'does by default (cheapest for the guest; it also lets the '
             'guest send large segments). False writes <driver><host '
             'csum="off"/></driver> into every virtio interface of the '
             'guests of this host (FT or not), so that guests finish '
             'their checksums themselves: needed where the host cannot, '
             'e.g. Open vSwitch\'s userspace (netdev) datapath sending '
             'through a Geneve or VXLAN tunnel, where TCP between hosts '
             'otherwise fails. Set it alike on every host a guest may '
             'fail over to: the secondary runs the primary\'s XML.'),
    cfg.BoolOpt(
        'rbd_volumes', default=False,
        help='nova-compute (FTLibvirtDriver) only: protect FT servers '
             'whose Cinder volumes (booted from or attached) are on Ceph '
             'RBD (doc/volumes.rst): the secondary host gets its own '
             'attachment of each volume while it stands by, and Cinder\'s '
             'records move to it on failover. Volumes of any other '
             'backend are refused, as they are when this is false (the '
             'default: every volume refused). Turn it on only where every '
             'FT host\'s agent protects shared RBD disks.'),
    cfg.BoolOpt(
        'reprotect_after_handoff', default=True,
        help='nova-compute (FTLibvirtDriver) only: once a server has '
             'been handed off to this host, choose a new secondary '
             '(never the failed host) through Placement, as at spawn, '
             'hold it there and protect onto it. Leave [agent] peers '
             'empty under Nova, so that agents do not re-protect outside '
             'Placement first.'),
    cfg.FloatOpt(
        'reprotect_retry_interval', default=30.0, min=1,
        help='nova-compute (FTLibvirtDriver) only: seconds between two '
             'attempts to re-protect a server of this host that runs '
             'unprotected though it asks for FT (its secondary lost, or '
             'no host free for one), each as at spawn: a new secondary '
             'chosen and held through Placement. The first attempt '
             'follows the loss at once; ft_status says why the last one '
             'failed.'),
]

replication_opts: list[cfg.Opt] = [
    cfg.BoolOpt(
        'tls', default=True,
        help='Mutual TLS 1.3 on the checkpoint stream and on the disk '
             'replica (NBD), with credentials made for each pair when its '
             'secondary is prepared and handed to the primary in the '
             'agent\'s RPC reply. Turning it off gives up all of it: '
             'anyone who reaches a secondary\'s data port first becomes '
             'its primary (and can have it start a guest of their '
             'choosing, or fail it over), anyone who reaches its NBD '
             'port can read and write the tenant\'s disk replica, and '
             'guest RAM and disk travel in clear. Turn it off only on a '
             'dedicated replication network that no one else can reach, '
             'and only if its cost per epoch matters (see '
             'benchmarks/tls_cost.py). A peer whose setting differs is '
             'not taken as a secondary: neither side downgrades.'),
]

metrics_opts: list[cfg.Opt] = [
    cfg.PortOpt(
        'port',
        help='TCP port of the agent\'s Prometheus endpoint '
             '(http://bind_address:port/metrics): per-guest epochs, '
             'pauses, replication lag, held output, protected or not, and '
             'failovers. Unset (the default): no endpoint. It has no '
             'authentication and names the guests of this host, so '
             'nothing listens unless you ask for it.'),
    cfg.HostAddressOpt(
        'bind_address', default='127.0.0.1',
        help='Address the Prometheus endpoint listens on. The default '
             'serves a scraper or proxy on this host only; set the '
             'address of the management network for a Prometheus '
             'elsewhere, never one that tenants reach.'),
]

GROUPS: dict[str, list[cfg.Opt]] = {
    'agent': agent_opts,
    'fencing': fencing_opts,
    'ft': ft_opts,
    'metrics': metrics_opts,
    'replication': replication_opts,
}


def register_opts(conf: cfg.ConfigOpts) -> None:
    for group, opts in GROUPS.items():
        conf.register_opts(opts, group=group)


def list_opts() -> list[tuple[str, list[cfg.Opt]]]:
    """For oslo-config-generator (entry point ``oslo.config.opts``)."""
    return [(group, list(opts)) for group, opts in GROUPS.items()]


register_opts(CONF)
