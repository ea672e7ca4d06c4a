"""Keep an nbdkit worker thread's Python thread state for its whole connection.

nbdkit's python plugin wraps every callback in PyGILState_Ensure() and
PyGILState_Release().  nbdkit's worker threads are not Python threads: they
have no Python thread state between two callbacks, so Ensure creates one
for every request and Release destroys it again.  In CPython 3.11 that is
not cheap: a new thread state maps a fresh frame-stack chunk (mmap) on its
first call and unmaps it on release (munmap, and a TLB shootdown of the
other CPUs).  Measured with fio 4K random reads at QD32x2 under
`nbdkit --threads 2`: about half of the server's CPU time per request
(docs/benchmarks.md, "Kept thread states").

The cure is one extra PyGILState_Ensure() per worker thread, on its first
request: the thread state's use count never drops to zero again, so nbdkit's
Release only releases the GIL and the next request's Ensure only takes it.
Nothing is leaked: the connection's close callback runs after nbdkit joined
the connection's worker threads, and there the thread states they kept are
cleared and deleted (PyThreadState_Clear/Delete, with the GIL held, as
interpreter shutdown does for threads that are gone); on the calling thread
itself (nbdkit serving a connection without worker threads) the extra count
is given back with PyGILState_Release.

Only the standard library: ctypes reaches the C API of the interpreter
that runs us.  Where that C API cannot be reached, keep() does nothing and
requests work as before, only slower.
"""

import ctypes
import logging
import threading

log = logging.getLogger(__name__)


def _api():
    """The C functions this module needs, or None."""
    try:
        capi = ctypes.pythonapi
        fns = {}
        for name, restype, argtypes in (
                ("PyGILState_Ensure", ctypes.c_int, []),
                ("PyGILState_Release", None, [ctypes.c_int]),
                ("PyThreadState_Get", ctypes.c_void_p, []),
                ("PyThreadState_Clear", None, [ctypes.c_void_p]),
                ("PyThreadState_Delete", None, [ctypes.c_void_p]),
                ("PyInterpreterState_Get", ctypes.c_void_p, []),
                ("PyInterpreterState_ThreadHead", ctypes.c_void_p, [ctypes.c_void_p]),
                ("PyThreadState_Next", ctypes.c_void_p, [ctypes.c_void_p])):
            fn = getattr(capi, name)
            fn.restype, fn.argtypes = restype, argtypes
            fns[name] = fn
        return fns
    except (AttributeError, OSError) as e:      # no ctypes.pythonapi, a missing symbol
        log.info("Thread states are not kept (%s): every request makes a new one", e)
        return None


_API = _api()


def thread_state_count():
    """How many thread states the interpreter holds (call with the GIL held)."""
    if _API is None:
        return None
    n = 0
    ts = _API["PyInterpreterState_ThreadHead"](_API["PyInterpreterState_Get"]())
    while ts:
        n += 1
        ts = _API["PyThreadState_Next"](ts)
    return n


class KeptStates:
    """The thread states kept for the threads serving one connection.

    keep() runs on a thread's first request (the request path tests `kept`
    first); release() runs once, from the connection's close callback.
    """

    __slots__ = ("kept", "_lock")

    def __init__(self):
        # thread ident -> (thread state address, Ensure's answer).  The request
        # path tests `get_ident() in kept` itself and calls keep() only on a miss.
        self.kept = {}
        self._lock = threading.Lock()

    def keep(self, get_ident=threading.get_ident):
        ident = get_ident()
        if ident in self.kept:
            return
        if _API is None:
            self.kept[ident] = None
            return
        state = _API["PyGILState_Ensure"]()      # the GIL is ours: this only counts up
        with self._lock:
            self.kept[ident] = (_API["PyThreadState_Get"](), state)

    def release(self):
        """Give back every kept thread state (their threads have ended, or it is ours)."""
        with self._lock:
            kept = dict(self.kept)
            self.kept.clear()
        if _API is None:
            return
        current = _API["PyThreadState_Get"]()
        released = 0
        for entry in kept.values():
            if entry is None:
                continue
            ts, state = entry
            if ts == current:
                _API["PyGILState_Release"](state)   # counts down; our caller releases it
            else:
                _API["PyThreadState_Clear"](ts)
                _API["PyThreadState_Delete"](ts)
            released += 1
        log.info("Connection closed: thread states released=%d left=%d",
                 released, thread_state_count())
