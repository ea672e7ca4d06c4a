"""The store of a pivoted disk: a plain backend (the former mirror target)."""

import errno


class BackendStore:
    """A plain backend (the mirror target after a pivot) with the store's interface."""

    cluster_size = 65536

    def __init__(self, backend):
        self.backend = backend
        self.size = backend.size()

    has_base = False      # no backing chain: sync=top is sync=full

    def read(self, buf, offset):
        self.backend.readinto(buf, offset)

    def write(self, buf, offset, fua=False):
        self.backend.write(buf, offset, fua)

    def zero(self, offset, length, may_trim=False, fast=False, fua=False):
        if fast and not may_trim:
            raise OSError(errno.ENOTSUP, "fast zero needs trim on a pivoted disk")
        self.backend.zero(offset, length, may_trim, fua)

    def trim(self, offset, length, fua=False):
        self.backend.zero(offset, length, True, fua)

    def flush(self):
        self.backend.flush()

    def cache(self, offset, length):
        pass

    def extents(self, offset, length, req_one=False):
        result = self.backend.extents(offset, length)
        return result[:1] if req_one else result

    def allocation(self):
        return {}

    def close(self):
        self.backend.close()
