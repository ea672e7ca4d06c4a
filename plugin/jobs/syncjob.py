"""SyncedCopyJob: a copying job that converges, reports READY and keeps its target in
sync with client writes until complete or cancel (the mirror and the commit).

The loop (_run): copy what is dirty (CopyPipeline), apply the policies to
failures (CopyJob._handle_failures), checkpoint while copying (FlushPipeline),
and once nothing is dirty and nothing in flight, flush; a flush that started
with the copy converged makes the job READY (_after_flush: the one place it
happens).  While ready, new writes are copied in batches (READY_COPY_INTERVAL)
and flushed about once a second.  Subclasses say what is dirty first
(_first_dirty), what else a turn does (_each_turn) and what complete does
(prepare).  Client changes reach the job through the intent log (a Disk guard)
and the dirty-bitmap listener, from _start_listening (the subclass's attach) to
_stop_listening (prepare, abort, clean).
"""

import logging

from .copyjob import NEXT_TURN, STOP, CopyJob

log = logging.getLogger(__name__)

# While ready, new writes are copied in batches at least this often.
READY_COPY_INTERVAL = 0.1
# While ready, flush the target this often (if something was copied), so that
# a lost target connection costs a re-copy of at most this much work.
READY_FLUSH_INTERVAL = 1.0
# A checkpoint saves the job record (its progress) at most this often.
RECORD_PROGRESS_INTERVAL = 1.0


class SyncedCopyJob(CopyJob):
    soft_cancel_when_ready = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.flushes.after = self._after_flush
        self._last_progress_save = self.clock.now()
        self._listening = False
        self._hooked_store = None            # the store whose commits sync the intent log

    def _first_dirty(self):
        """A new job's first dirty set (after attach(): later writes are the listener's)."""
        raise NotImplementedError

    def _each_turn(self):
        """What the job does first in each turn of its loop (raise to fail it)."""

    def _start_listening(self):
        """With clients quiesced: the intent log as a Disk guard and the listener,
        so that every change after this passes both.  False if already listening
        (attach() runs before start() and again first thing in run())."""
        if self._listening:
            return False
        with self.disk.quiesce():
            intent, store = self.intent, self.disk.store
            if intent is not None:
                defers = getattr(store, "defers_durability", None)
                if defers is not None and self._may_defer_sets():
                    # The hooks first: no set is deferred before both are there.
                    store.add_commit_hook(intent.sync_owed)
                    self._hooked_store = store     # a pivot changes the disk's store
                    self.copy.before_send = intent.sync_owed
                    intent.defer = defers
                self.disk.add_guard(intent)
            self.disk.add_listener(self._on_change)
            self._listening = True
        return True

    def _may_defer_sets(self):
        """May the intent log defer the sync of a set the store cannot make
        durable before its next commit (IntentLog.defer)?  Only where nothing
        but the copy pipeline sends the disk's bytes to the target."""
        return False

    def _stop_deferring(self):
        """No set is deferred from now on, and none stays owed."""
        intent = self.intent
        if intent is not None and intent.defer is not None:
            intent.defer = None
            intent.sync_owed()

    def _stop_listening(self):
        if self._listening:
            self.disk.remove_listener(self._on_change)
            intent = self.intent
            if intent is not None:
                self.disk.remove_guard(intent)
                if self._hooked_store is not None:
                    self._stop_deferring()
                    self._hooked_store.remove_commit_hook(intent.sync_owed)
                    self._hooked_store = None
            self._listening = False

    def abort(self):
        self._stop_listening()

    def _on_change(self, kind, offset, length, buf):
        """Disk listener: runs in the client's thread after its change completed.

        Before READY a clean-to-dirty change wakes the job at once; once ready
        the job collects writes for up to READY_COPY_INTERVAL, so a busy
        client does not wake it (and contend for the GIL) on every write."""
        # mark_part: a change inside one clean granule copies only its bytes.
        # A failed change ("failed") is copied too: some of it may have landed.
        if self.bitmap.mark_part(offset, length) and (not self.is_ready or kind == "failed"):
            self.kick()

    def run(self):
        try:
            self._run()
        finally:
            self.compare.stop()
            if self.suspended:
                self._shutdown_checkpoint()

    def _run(self):
        copy, flushes = self.copy, self.flushes
        self.attach()
        self.link.connect()
        if not self.link.await_open(self, self.disk.size, lambda: self.policy_for("write")):
            return
        self.trust.connected(self.compare.pending, flushes, self.id)
        if not self._restored:
            self._first_dirty()
        pos = 0
        while True:
            self._each_turn()
            if self._pause_point():
                return
            if self.should_complete or self.cancel_requested:
                if self._leave_asked is None:
                    self._leave_asked = self.clock.now()
                self._check_stall()
            if self.compare.pending:
                self.compare.start(self.target)
            if self.compare.running:
                self.compare.collect()
            copied_before = copy.copied
            pos, then = self._copy_turn(pos)
            if then == STOP:
                return
            if then == NEXT_TURN:
                continue
            if flushes.checkpoint_due(self.is_ready):
                self._start_flush(to_ready=False)
            if self.target.in_flight():
                continue
            progressed = copy.copied != copied_before
            now = self.clock.now()
            if copy.pending():
                if copy.retries.gate > now or not progressed:
                    # Nothing could start (the retry gate is closed): wait.
                    self.sleep(max(0.01, copy.retries.gate - now))
                # Otherwise a rate-limited job copied its one range: go on at once.
                continue
            if self.compare.running:
                # Nothing else left to copy: copying what is not compared yet is
                # faster than waiting for the comparison, which never delays READY.
                log.info("%s stops comparing job=%s: copying the rest", self.kind, self.id)
                self.compare.stop()
                continue
            if copy.retries:
                self.sleep(max(0.01, copy.retries.next_due() - now))
                continue
            if self._flush_due(now):
                if copy.retries.gate_open():
                    self._start_flush()
                else:           # a flush failed a moment ago: not again at once
                    self.sleep(max(0.01, copy.retries.gate - now))
                continue
            if not self.is_ready:
                if self.trust.now_ready():
                    self._save()
                self._update_progress()
                self.transition_to_ready()
            if self.should_complete or self.cancel_requested:
                return
            if flushes.unflushed.is_clean():
                self.sleep(READY_COPY_INTERVAL)
            else:
                self.sleep(max(0.01, min(READY_COPY_INTERVAL,
                                         flushes.last_flush + READY_FLUSH_INTERVAL - now)))

    def _after_flush(self, flush):
        """A flush succeeded: vouch for the target, save progress, and READY if
        the copy had converged when it started (in sync now, even if clients
        have written since: QEMU does the same)."""
        if flush.to_ready:
            self.trust.now_ready()
        if self.intent is not None:
            self._update_progress()
            now = self.clock.now()
            if (flush.to_ready or flush.leaving
                    or now - self._last_progress_save >= RECORD_PROGRESS_INTERVAL):
                self._last_progress_save = now
                self._save()
        if flush.to_ready and not self.is_ready:
            self._update_progress()
            self.transition_to_ready()

    def _flush_due(self, now):
        """Everything is copied: should the target be flushed now?

        Before READY: if anything was copied (READY follows the flush, see
        _after_flush).  Before leaving for prepare(): one good flush after
        complete/cancel was asked, which finds a target lost while idle.
        While ready: about once a second if anything (write-throughs too)
        was written since, to keep a re-copy after a reconnect small.
        """
        flushes = self.flushes
        if not self.is_ready:
            return flushes.copied_since_flush
        if (self.should_complete or self.cancel_requested) and not flushes.exit_flushed:
            return True
        # A checkpoint also clears the intent log, so an idle mirror keeps
        # flushing until the log is clear (the regions clients wrote last
        # are cleared one interval after their last change).
        lagging = self.intent is not None and self.intent.set_bytes() > 0
        return ((lagging or not flushes.unflushed.is_clean())
                and now - flushes.last_flush >= READY_FLUSH_INTERVAL)
