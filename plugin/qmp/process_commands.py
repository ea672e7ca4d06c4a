"""x-query-process: what the nbdkit process holds (an extension; QEMU has no such command).

For monitoring (`jobctl metrics`, docs/service.md): resident memory, open
descriptors against their limit, threads, CPU time, start time, and the NBD
connections clients have open.  Nothing here changes anything.
"""

from ..core import procstat


def register_process_commands(registry, connections):
    """Register x-query-process; `connections` is the OpenCount of NBD connections."""

    def query_process():
        info = procstat.usage()
        info["nbd-connections"] = connections.open
        info["nbd-connections-total"] = connections.total
        return info

    registry.register("x-query-process", query_process)
