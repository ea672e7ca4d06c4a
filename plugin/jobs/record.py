"""Job records: what a job needs to go on after the process ends.

One JSON file per job, STATE_DIR/jobs/<id>.json, replaced atomically like
meta.json (write a temporary file, fsync, rename, fsync the folder), so a
crash leaves the old or the new record.  A mirror or commit also keeps its
write-intent log next to it (<id>.intent, plugin/blockcopy/intent.py).

A record holds the job's settings (Job.settings(): target, sync,
granularity, buf-size, policies, copy-mode...), the engine's state
(Job.saved_state(): speed, paused, io-status, ready-seen, offset, len,
auto-finalize/auto-dismiss), a generation (bumped on every save) and whether
the process saved it on its way out ("shutdown": true) or it was left by a
crash.  The engine saves on every change a restart must keep and forgets the
record as the job concludes (see Job.durable in engine.py).

Record format version 1; a record of another version, or one that does not
parse, stops start-up with one line naming the file (nothing is lost: move
the file away to start without the job).
"""

import json
import logging
import os
import threading

from ..disk import statedir

log = logging.getLogger(__name__)

FORMAT = "overlay-nbd-job"
VERSION = 1
SUFFIX = ".json"
INTENT_SUFFIX = ".intent"
BACKUP_SUFFIXES = (".needed", ".saved", ".cbw", ".frozen", ".answered")   # a backup's point in time


class RecordError(Exception):
    """A job record that cannot be used; the message is one line for the operator."""


class JobRecords:
    """The job records of one state directory."""

    def __init__(self, state):
        self.state = state
        self._lock = threading.Lock()
        self._generations = {}
        self._closed = False

    def close(self):
        """Shutdown: records are final now; a late save from a job thread is dropped."""
        with self._lock:
            self._closed = True

    def _dir(self):
        return self.state.jobs_dir()

    def path(self, job_id):
        return os.path.join(self._dir(), job_id + SUFFIX)

    def intent_path(self, job_id):
        return os.path.join(self._dir(), job_id + INTENT_SUFFIX)

    def backup_path(self, job_id):
        """The prefix of a backup's point-in-time files (blockcopy/snapshot.py)."""
        return os.path.join(self._dir(), job_id)

    def save(self, job, shutdown=False):
        """Write the job's record now (the latest state wins: taken under the lock,
        shutdown too: once the job's suspend() began every save says so)."""
        with self._lock:
            if self._closed:
                return
            shutdown = shutdown or getattr(job, "shutting_down", False)
            generation = self._generations.get(job.id, 0) + 1
            record = {"format": FORMAT, "version": VERSION, "generation": generation,
                      "shutdown": shutdown}
            record.update(job.settings())
            record.update(job.saved_state())
            statedir.write_json_atomic(self.path(job.id), record)
            self._generations[job.id] = generation
        log.debug("Job record saved job=%s generation=%d", job.id, generation)

    def forget(self, job):
        """The job concluded: remove its record, then its other files."""
        with self._lock:
            if self._closed:
                return
            self._generations.pop(job.id, None)
            try:
                os.unlink(self.path(job.id))
            except FileNotFoundError:
                pass
            statedir.fsync_dir(self._dir())
        remove = getattr(job, "remove_files", None)
        if remove is not None:
            remove()
        log.info("Job record removed job=%s", job.id)

    def forget_id(self, job_id):
        """Remove the record (and intent log) of a job that is not restored."""
        paths = [self.path(job_id), self.intent_path(job_id)]
        paths += [self.backup_path(job_id) + suffix for suffix in BACKUP_SUFFIXES]
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        statedir.fsync_dir(self._dir())

    def load_all(self):
        """Every record, oldest first by file order of ids; RecordError for a bad one.

        Intent logs without a record (a crash between the two removals) are deleted.
        """
        folder = self.state.file(statedir.JOBS)
        if not os.path.isdir(folder):
            return []
        names = sorted(os.listdir(folder))
        records = []
        for name in names:
            if not name.endswith(SUFFIX):
                continue
            path = os.path.join(folder, name)
            records.append(_load(path, name[:-len(SUFFIX)]))
        ids = {r["id"] for r in records}
        for name in names:
            stem, suffix = os.path.splitext(name)
            if suffix in (INTENT_SUFFIX,) + BACKUP_SUFFIXES and stem not in ids:
                os.unlink(os.path.join(folder, name))
                log.info("Orphan job file removed file=%s", name)
            elif name.endswith(".tmp"):
                os.unlink(os.path.join(folder, name))
        for r in records:
            self._generations[r["id"]] = r["generation"]
        records.sort(key=lambda r: r.get("created", 0))
        return records


_REQUIRED = {"id": str, "type": str, "generation": int, "paused": bool, "io-status": str,
             "offset": int, "len": int, "speed": int}


def _load(path, job_id):
    try:
        with open(path) as f:
            record = json.load(f)
    except ValueError as e:
        raise RecordError("job record %s is corrupt (%s): move it away to start without "
                          "the job" % (path, e)) from None
    except OSError as e:
        raise RecordError("job record %s: %s" % (path, e.strerror)) from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise RecordError("%s is not a job record: move it away to start without it" % path)
    if record.get("version") != VERSION:
        raise RecordError("job record %s has version %r, this server reads version %d"
                          % (path, record.get("version"), VERSION))
    for key, kind in _REQUIRED.items():
        if not isinstance(record.get(key), kind):
            raise RecordError("job record %s: %r missing or not a %s"
                              % (path, key, kind.__name__))
    if record["id"] != job_id:
        raise RecordError("job record %s holds job %r" % (path, record["id"]))
    if record["type"] not in ("mirror", "stream", "backup", "commit"):
        raise RecordError("job record %s: unknown job type %r" % (path, record["type"]))
    return record
