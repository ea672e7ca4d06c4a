"""Errors shared by every layer.

- :class:`CommandError`: a request (a QMP command, a job verb) is refused.
  The job engine raises it and the QMP layer answers it as
  ``{"error": {"class", "desc"}}``; it lives here so neither imports the other.
- :func:`errno_of`: the errno an exception stands for (EIO when it has none).
- :func:`os_error`: an OSError for an errno that keeps a message saying where
  it happened, so a log line or a refusal can name the cause.
"""

import errno as _errno
import os


class CommandError(Exception):
    """A refused command: {"error": {"class": cls, "desc": desc}}."""

    def __init__(self, desc: str, cls: str = "GenericError"):
        super().__init__(desc)
        self.desc = desc
        self.cls = cls

    def to_reply(self) -> dict:
        """The QMP error object, without the id."""
        return {"error": {"class": self.cls, "desc": self.desc}}


def errno_of(exc: BaseException, default: int = _errno.EIO) -> int:
    """The errno of an OSError (``default`` for anything else or errno 0)."""
    err = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    return err if isinstance(err, int) and err else default


def os_error(err: int, detail: str | None = None) -> OSError:
    """OSError(err) whose message is strerror plus ``detail`` (if any)."""
    text = os.strerror(err)
    return OSError(err, "%s: %s" % (text, detail) if detail else text)


def error_text(exc: BaseException) -> str:
    """The short text a job error shows in events and queries (strerror for OSError)."""
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def errno_name(err: int) -> str:
    """"EIO" for 5; the number as text if it has no name."""
    return _errno.errorcode.get(err, str(err))
