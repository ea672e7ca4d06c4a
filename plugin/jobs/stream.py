"""The stream job (block-stream): copy the base into the overlay, then drop the base.

As QEMU's block/stream.c, streaming is copy-on-read of the whole disk while
clients keep using it.  The job walks the disk from start to end in chunks:

- runs of clusters the overlay holds already (DATA or ZERO) are skipped by
  looking at the cluster map alone: they count as progress but cost nothing,
  not even against the speed limit;
- a chunk with absent clusters goes to ``OverlayStore.populate()``, which
  copies the base's bytes in under the store's range lock and leaves every
  cluster that the overlay holds by then alone.  A client write, even a
  partial-cluster one racing the copy of the same cluster, therefore always
  wins over the older base data: it either lands first (the stream then skips
  the cluster) or waits for the copy and is applied on top of it.

When the walk is done every cluster is held by the overlay.  ``prepare()``
then quiesces the disk (no client request may be reading the base at that
moment) and drops the base durably (``OverlayStore.drop_base``): the overlay
flushes, then the state directory forgets the base, so a restart needs none.

Progress is QEMU's: ``len`` is the disk size, ``offset`` the bytes processed,
skipped clusters included.

Durability: the stream's progress is the cluster map itself (a cluster the
overlay holds is never copied again).  Every CHECKPOINT_INTERVAL the job
flushes the overlay (the map commit makes the copied clusters durable) and
saves its record; a resumed stream walks the disk again and copies only what
is still absent.  The checkpoint runs in a thread of its own, one at a time,
while the copy goes on: its fdatasync writes back what was copied so far
instead of stopping the copy (in the job thread the syncs took 0.6 of 1.3 s
for 1 GiB).  The record's offset is progress for display only.

Errors (of a populate: reading the base, or writing the overlay) go through
``Job.report_io_error`` as operation "read", as QEMU reports every stream
error (its copy-on-read is a read):

- report: the job ends with the error where it stopped; the base stays;
- ignore: the chunk is left absent, the job backs off a little and carries
  on to the end, then fails with the first such error (offset == len) and
  keeps the base: the overlay is not standalone.  A later stream copies what
  is missing;
- stop (and enospc/auto for ENOSPC): the job pauses with io-status
  failed/nospace; after resume the same chunk is tried again.
"""

import logging

from ..blockcopy.cadence import Cadence
from ..core.errors import errno_of
from ..core.threads import Thread
from .engine import Job

log = logging.getLogger(__name__)

MiB = 1 << 20
CHUNK = 1 * MiB
BACKOFF_FIRST = 0.01
BACKOFF_MAX = 0.5
CHECKPOINT_INTERVAL = 1.0
CHECKPOINT_FRACTION = 32          # ... or after this fraction of the disk was copied


class StreamJob(Job):
    """block-stream on `disk`, whose store is an OverlayStore with a base.

    prepare() drops the base (``OverlayStore.drop_base``), with the disk
    quiesced, once every cluster is in the overlay.
    """

    changeable_options = frozenset({"on_error"})

    def __init__(self, job_id, bus, disk, on_error="report", speed=0, auto_finalize=True,
                 auto_dismiss=True, chunk=CHUNK, clock=None):
        super().__init__(job_id, "stream", bus, device=disk.device, speed=speed,
                         auto_finalize=auto_finalize, auto_dismiss=auto_dismiss, clock=clock)
        self.disk = disk
        self.store = disk.store
        self.on_error = on_error
        cs = self.store.cluster_size
        self.chunk = max(1, chunk // cs) * cs
        self._first_ignored = None    # OSError: the job fails with it at the end
        self._backoff = 0.0
        self._copied = 0
        self._floor = 0               # a restored job's offset: progress never goes back
        self.created = None
        self._flusher = None          # the checkpoint under way (a thread)
        self._checkpoints = Cadence(self.store.size, self.clock.now, CHECKPOINT_INTERVAL,
                                    CHECKPOINT_FRACTION)
        self.set_progress(0, self.store.size)

    def policies(self):
        return {"on-error": self.on_error}

    def copied_bytes(self):
        return self._copied

    def settings(self):
        return {"base": getattr(self.store.state, "base", None), "on-error": self.on_error,
                "created": self.created}

    def restore_state(self, paused, io_status, offset, total, ready_seen):
        super().restore_state(paused, io_status, offset, self.store.size, ready_seen)
        self._floor = min(offset, self.store.size)

    def set_progress(self, offset=None, total=None):
        if offset is not None:
            offset = max(offset, self._floor) if hasattr(self, "_floor") else offset
        super().set_progress(offset, total)

    def _checkpoint(self):
        """Make the copied clusters durable and save the record (about once a second),
        in a thread while the copy goes on; one at a time."""
        if self.durable is None or not self._checkpoints.due(self._copied, idle=True):
            return
        if self._flusher is not None:
            if self._flusher.is_alive():
                return
            self._flusher.join()
        self._checkpoints.mark(self._copied)
        self._flusher = Thread(target=self._flush_and_save, daemon=True,
                               name="stream-checkpoint-%s" % self.id)
        self._flusher.start()

    def _flush_and_save(self):
        try:
            self.store.flush()
        except OSError as e:
            log.warning("Stream checkpoint flush failed job=%s error=%s", self.id, e)
            return
        self._save()

    def _join_checkpoint(self):
        if self._flusher is not None:
            self._flusher.join()
            self._flusher = None

    def change(self, on_error=None):
        if on_error is not None:
            self.on_error = on_error
        log.info("Stream changed job=%s on_error=%s", self.id, self.on_error)

    # -- the job thread ----------------------------------------------------

    def run(self):
        try:
            self._run()
        finally:
            self._join_checkpoint()

    def _run(self):
        store = self.store
        log.info("Stream started job=%s size=%d chunk=%d on_error=%s", self.id, store.size,
                 self.chunk, self.on_error)
        pos = 0
        while True:
            if self.pause_point():
                return
            # Clusters the overlay holds never become absent again: skip them.
            run = store.next_absent(pos)
            if run is None:
                break
            start = run[0]
            length = min(run[1], self.chunk - start % self.chunk)
            self.set_progress(start)
            copied = 0
            try:
                copied = store.populate(start, length)
            except OSError as e:
                if not self._handle_error(e, start, length):
                    continue          # stopped and resumed: the same chunk again
            else:
                self._backoff = 0.0
                self._copied += copied
            pos = start + length
            self.set_progress(pos)
            self._checkpoint()
            if copied and self.throttle(copied):
                return
        self.set_progress(store.size)
        if self._first_ignored is not None:
            raise self._first_ignored
        log.info("Stream copied job=%s bytes=%d", self.id, self._copied)

    def _handle_error(self, exc, offset, length):
        """Apply on-error to a failed chunk; True to move on, False to retry it.

        Raises for "report".  After "stop" the job has been paused and
        resumed (or cancelled) inside report_io_error.
        """
        err = errno_of(exc)
        log.warning("Stream chunk failed job=%s offset=%d length=%d error=%s",
                    self.id, offset, length, exc)
        action = self.report_io_error("read", err, self.on_error)
        if action == "report":
            raise exc
        if action == "stop":
            return False
        if self._first_ignored is None:
            self._first_ignored = exc
        # A base that fails every read must not be hammered: back off a little.
        self._backoff = min(BACKOFF_MAX, max(BACKOFF_FIRST, self._backoff * 2))
        self.sleep(self._backoff)
        return True

    # -- completion --------------------------------------------------------

    def prepare(self):
        """Drop the base: every cluster is in the overlay now.

        The disk is quiesced so that no client read that saw an absent
        cluster before the stream copied it is still reading the base.
        """
        # drop_base refuses while any cluster is absent: a base that still
        # holds data of the disk is never forgotten.
        with self.disk.quiesce():
            self.store.drop_base()
        log.info("Stream finished job=%s base dropped", self.id)
