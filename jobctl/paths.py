"""Make the paths jobctl sends absolute against the caller's working directory.

The server runs in its own directory (nbdkit daemonized runs in /), so a
relative path a user types (`jobctl mirror disk0 target.img`, or
`nbd+unix:///?socket=t.sock`) would be opened there, not where the user is.
jobctl resolves such paths itself before sending them: a file target, and the
path-valued query parameters of NBD URIs.
"""

import os
import urllib.parse

NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix", "nbd+vsock", "nbds+vsock")

# libnbd's URI query parameters that name a local file or directory.
PATH_PARAMETERS = ("socket", "tls-psk-file", "tls-certificates")

# Characters left as they are when a path is put back into a URI query.
_QUERY_SAFE = "/-._~!$'()*+,;=:@"


def absolute_target(target, cwd=None):
    """A mirror target (file path or NBD URI) with its paths made absolute.

    Any other URI (something://...) is returned unchanged for the server to judge.
    """
    cwd = os.getcwd() if cwd is None else cwd
    scheme, sep, _ = target.partition("://")
    if sep:
        if scheme.lower() in NBD_SCHEMES:
            return absolute_nbd_uri(target, cwd)
        return target
    return absolute_path(target, cwd)


def absolute_nbd_uri(uri, cwd=None):
    """An NBD URI whose socket=, tls-psk-file= and tls-certificates= are absolute.

    Only those parameter values change; the rest of the URI is kept byte for byte.
    """
    cwd = os.getcwd() if cwd is None else cwd
    head, sep, query = uri.partition("?")
    if not sep:
        return uri
    query, hash_sep, fragment = query.partition("#")
    parameters = []
    for parameter in query.split("&"):
        key, eq, value = parameter.partition("=")
        if eq and urllib.parse.unquote(key) in PATH_PARAMETERS:
            path = urllib.parse.unquote(value)
            if path and not os.path.isabs(path):
                value = urllib.parse.quote(absolute_path(path, cwd), safe=_QUERY_SAFE)
        parameters.append(key + eq + value)
    return head + sep + "&".join(parameters) + hash_sep + fragment


def absolute_path(path, cwd=None):
    """path joined to cwd unless absolute; a leading "./" is dropped.

    Not normalised further: "a/../b" stays as written, since through a
    symlinked "a" it means what the kernel says, not what a string
    rewrite would.
    """
    cwd = os.getcwd() if cwd is None else cwd
    if os.path.isabs(path):
        return path
    while path.startswith("./"):
        path = path[2:].lstrip("/")
    if path in ("", "."):
        return cwd
    return os.path.join(cwd, path)
