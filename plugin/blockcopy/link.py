"""The target link: connecting a copying job to its target, and keeping it connected.

The target (backends: a file, an NBD export, an RBD image) connects in the
background; a fresh job's command waits for it a little (wait_open), a
restored job connects when it runs.  A target that cannot be reached is a
write error for the job's on-target-error policy (:meth:`TargetLink.await_open`):
report ends the job, stop pauses it (resume tries again), ignore tries again
with a growing delay.  A connection lost later reconnects in the background
(within reconnect-delay invisibly); `on_loss` callbacks run, inside the
target's call that noticed the loss and before anything goes to a new
connection, so the job can copy again what the old one acknowledged
unflushed.  After a write error :meth:`recover` waits, cancellably, for a
working connection.

:class:`TargetTrust` decides whether a restored job may trust the COPIED
regions a crash left (the same target instance answered them: see
backends' instance()) or must compare them.
"""

import logging

from ..backends import CONNECT_TIMEOUT, open_target, redact
from ..core.errors import CommandError, errno_of

log = logging.getLogger(__name__)

CONNECT_BACKOFF_MAX = 5.0


class TargetLink:
    def __init__(self, address, reconnect_delay, job_id, connect=True, kind="Mirror",
                 on_open=None):
        self.kind = kind                  # for the log: "Mirror", "Backup", ...
        self.on_open = on_open            # called with each new target object
        self.address = address
        self.reconnect_delay = reconnect_delay
        self.job_id = job_id
        self.name = redact(address)
        self.on_loss = []                 # callables, in order, when the connection is lost
        self.target = self._open() if connect else None

    def _open(self):
        target = open_target(self.address, self.reconnect_delay)
        target.on_loss = self._lost
        if self.on_open is not None:
            self.on_open(target)
        return target

    def _lost(self):
        for callback in self.on_loss:
            callback()

    def connect(self):
        """Start connecting, if not yet (a restored job, in its thread)."""
        if self.target is None:
            self.target = self._open()
        return self.target

    def check_size(self, size):
        if self.target.size() != size:
            raise CommandError("Source and target image have different sizes")

    def await_open(self, job, size, policy):
        """In the job thread: wait for the target connection; False if cancelled first.

        job: pause_point(), report_io_error(), cancelled, sleep();
        policy(): the on-target-error policy now.
        """
        delay = 0.05
        while True:
            try:
                while not self.target.wait_open(0.1):
                    if job.pause_point():
                        return False
                self.check_size(size)
                return True
            except OSError as e:
                log.warning("%s target unreachable job=%s target=%s error=%s",
                            self.kind, self.job_id, self.name, e)
                action = job.report_io_error("write", errno_of(e), policy())
                if action == "report":
                    raise
                if job.cancelled or (action == "ignore" and job.sleep(delay)):
                    return False
                delay = min(CONNECT_BACKOFF_MAX, delay * 2)
                self.target.close()
                self.target = self._open()

    def recover(self, cancelled, clock):
        """After a write error: wait (cancellably, at most CONNECT_TIMEOUT) for a
        working target connection; the on_loss callbacks did the bookkeeping."""
        deadline = clock() + CONNECT_TIMEOUT
        while not self.target.reconnect(0.1):
            if cancelled() or clock() > deadline:
                log.warning("%s target not reconnected job=%s target=%s", self.kind,
                            self.job_id, self.name)
                return

    def reads_zero(self, size):
        """True if the target is known to read as zeros (its zero ranges need no copy).

        A failed query only means "not known": the zeroing pass then runs and
        its errors go through the policy like any other write.
        """
        try:
            return all(e.zero for e in self.target.extents(0, size))
        except OSError as e:
            log.warning("%s target extents failed job=%s error=%s", self.kind, self.job_id, e)
            return False

    def instance(self):
        """What holds the writes this target answered (backends' instance()), or None."""
        instance = getattr(self.target, "instance", None)
        try:
            return instance() if instance is not None else None
        except OSError:
            return None

    def close(self):
        if self.target is not None:
            self.target.close()


def describe(instance):
    """A target instance for the log."""
    return " ".join("%s=%s" % (k, v) for k, v in sorted(instance.items()) if k != "boot")


class TargetTrust:
    """Which target instance the job's record vouches for.

    target.instance() names what holds the writes the target answered: the
    same file in the same boot (the page cache), or the same NBD server
    process over a Unix socket, with multi-conn (a flush on a new connection
    covers the old one's writes); None where nothing can tell (TCP, RBD).
    The COPIED regions a crash left (exact within a boot: intent.py) were
    answered by the instance the record names, so when it is this one they
    need no comparison: they are unflushed copies, made durable by the next
    flush, copied again if it fails.

    A fresh job vouches for its instance at once.  A restored one whose
    intent log has COPIED regions of another instance (or of an unknown
    one) vouches only once READY: by then every such region is compared or
    copied again, and flushed.  A lost connection takes it back
    (:meth:`unvouch`), before anything goes to a new one.
    """

    def __init__(self, link, recorded, restored, save):
        self._link = link
        self.instance = self._recorded = recorded   # what the record vouches for
        self._restored = restored
        self._save = save                 # saves the job record (it holds `instance`)
        self._at_ready = None             # vouched for once READY (after a comparison)
        self.inherited_copied = False     # the restored intent log had COPIED regions

    def trusts(self):
        """A restored job, connected to the very instance its record vouches for."""
        current = self._link.instance()
        return self._restored and current is not None and current == self._recorded

    def connected(self, to_compare, flushes, job_id):
        """Connected: trust the restored COPIED ranges (`to_compare`, emptied) if the
        record vouches for this instance; record what is vouched for now."""
        current = self._link.instance()
        trusted = (self._restored and current is not None and current == self._recorded)
        if trusted and to_compare:
            ranges = list(to_compare)
            to_compare.clear()
            flushes.move_to_unflushed(ranges)
            log.info("%s trusts its copies job=%s bytes=%d: the same target instance (%s)",
                     self._link.kind, job_id, sum(n for _, n in ranges), describe(current))
        if not self._restored or trusted or not self.inherited_copied:
            if current != self.instance:
                self.instance = current
                self._save()
        else:
            self._at_ready = current
            if self.instance is not None:
                self.instance = None
                self._save()

    def now_ready(self):
        """READY: every COPIED region of another instance has been compared (so this
        one holds it) or copied again; vouch for this instance.  True if the
        record changed."""
        if self._at_ready is None:
            return False
        if self._link.instance() == self._at_ready:
            self.instance = self._at_ready
        self._at_ready = None
        return self.instance is not None

    def unvouch(self):
        self._at_ready = None
        if self.instance is not None:
            self.instance = None
            self._save()
