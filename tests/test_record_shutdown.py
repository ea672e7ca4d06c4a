"""A job record saved by a job thread while the process shuts down says shutdown=true
(found by tests/test_service.py under load: a checkpoint's save that had read
shutdown=false waited for suspend()'s save and then wrote over it)."""

import json
import queue
import threading

from plugin.jobs.engine import Job
from plugin.jobs.record import JobRecords
from plugin.qmp.events import EventBus


class _State:
    def __init__(self, path):
        self.path = path

    def jobs_dir(self):
        return str(self.path)


class _OrderedLock:
    """The records' lock, letting the test choose which waiting thread goes first."""

    def __init__(self):
        self._lock = threading.Lock()
        self.arrived = queue.Queue()

    def __enter__(self):
        go = threading.Event()
        self.arrived.put((threading.current_thread().name, go))
        assert go.wait(10)
        self._lock.acquire()

    def __exit__(self, *exc):
        self._lock.release()


def test_a_save_that_waited_for_the_records_lock_during_suspend_says_shutdown(tmp_path):
    records = JobRecords(_State(tmp_path))
    records._lock = lock = _OrderedLock()
    job = Job("j", "stream", EventBus())
    job.durable = records
    saver = threading.Thread(target=job._save, name="checkpoint")
    saver.start()
    name, let_saver_go = lock.arrived.get(timeout=10)
    assert name == "checkpoint"
    suspender = threading.Thread(target=job.suspend, name="suspend")
    suspender.start()
    name, let_suspend_go = lock.arrived.get(timeout=10)
    assert name == "suspend"
    let_suspend_go.set()                # suspend()'s save first ...
    suspender.join(10)
    let_saver_go.set()                  # ... then the checkpoint's, which had waited
    saver.join(10)
    record = json.loads((tmp_path / "j.json").read_text())
    assert record["shutdown"] is True
