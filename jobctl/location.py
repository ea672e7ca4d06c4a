"""Where the control socket is, and what to tell a user when nothing listens there.

--socket, else --overlay STATE_DIR, else $JOBCTL_SOCKET, else
$OVERLAY_DIR/control.sock, else ./control.sock (docs/jobctl.md).
"""

import os

DEFAULT_SOCKET = "control.sock"
SOCKET_ENV = "JOBCTL_SOCKET"
OVERLAY_ENV = "OVERLAY_DIR"
CONTROL_SOCKET_NAME = "control.sock"     # the plugin's default: STATE_DIR/control.sock


def locate_socket(args, environ=os.environ):
    """Return (path, origin): where the control socket is, and what said so.

    --socket, else --overlay STATE_DIR, else $JOBCTL_SOCKET, else
    $OVERLAY_DIR/control.sock, else ./control.sock.
    """
    if args.socket:
        return args.socket, "--socket"
    if args.overlay:
        return os.path.join(args.overlay, CONTROL_SOCKET_NAME), "--overlay"
    if environ.get(SOCKET_ENV):
        return environ[SOCKET_ENV], "$" + SOCKET_ENV
    if environ.get(OVERLAY_ENV):
        return os.path.join(environ[OVERLAY_ENV], CONTROL_SOCKET_NAME), "$" + OVERLAY_ENV
    return DEFAULT_SOCKET, "default"


def socket_path(args, environ=os.environ):
    """The control socket path (see locate_socket)."""
    return locate_socket(args, environ)[0]


def not_running_hint(path, origin, cwd=None):
    """Where jobctl looked and how to point it elsewhere, for "server not running"."""
    elsewhere = (f"point jobctl at the server with --socket PATH, --overlay STATE_DIR, "
                 f"{SOCKET_ENV}=PATH or {OVERLAY_ENV}=STATE_DIR")
    if origin == "--socket":
        return ""
    if origin == "default":
        cwd = os.getcwd() if cwd is None else cwd
        return f"; jobctl looked for ./{DEFAULT_SOCKET} in {cwd} (the default): {elsewhere}"
    if origin == "--overlay":
        return (f"; --overlay means STATE_DIR/{CONTROL_SOCKET_NAME}: a server started with "
                f"control=PATH needs --socket PATH")
    return f"; the path came from {origin}: {elsewhere}"
