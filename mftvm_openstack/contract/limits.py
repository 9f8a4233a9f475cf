"""The ranges of the settings a caller chooses, each defined once.

The ``[ft]`` options, the agent's RPC check, the CLI and Nova's flavor
validators all read them from here::

    low, high = EPOCH_MS_RANGE
"""

#: the epoch lengths (ms) the engine runs with
EPOCH_MS_RANGE = (20, 10000)
#: the longest idle epoch (ms): 0 (every epoch epoch_ms long) to a minute
IDLE_EPOCH_MS_RANGE = (0, 60000)
#: the adaptive epoch (ft.pair.cadence): the batching delay after a
#: guest's first packet (ms), the shortest epoch (ms), the most of the
#: time a guest may spend paused (percent)
OUTPUT_BATCH_MS_RANGE = (0, 1000)
MIN_EPOCH_MS_RANGE = (1, 10000)
PAUSE_PERCENT_RANGE = (5, 100)
#: the guest sizes a caller may ask for: memory (MiB) and virtual CPUs
MEMORY_MIB_RANGE = (16, 65536)
SMP_RANGE = (1, 64)
#: TCP ports
PORT_RANGE = (1, 65535)
#: the most bytes one boot file (a direct-kernel boot's kernel or initrd)
#: that a primary ships to its secondary may have: distribution kernels
#: are about 10 MiB, their initrds up to about 100 MiB
BOOT_FILE_MAX_BYTES = 128 << 20
