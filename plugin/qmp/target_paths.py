"""Paths in a drive-mirror target must be absolute.

The server's working directory is not the caller's (a daemonized nbdkit runs in
/), so a relative file target, or a relative socket= / tls-psk-file= /
tls-certificates= in an NBD URI's query, would name some other file: refuse it
with a message that says so.  jobctl makes such paths absolute before sending.
"""

import os
import urllib.parse

from ..backends import is_nbd_uri, is_rbd_uri
from ..core.errors import CommandError

NBD_PATH_PARAMS = ("socket", "tls-psk-file", "tls-certificates")
RBD_PATH_PARAMS = ("conf",)


def relative_paths(target):
    """[(what, path)] of every relative path the target address holds."""
    if is_nbd_uri(target) or is_rbd_uri(target):
        params = NBD_PATH_PARAMS if is_nbd_uri(target) else RBD_PATH_PARAMS
        query = urllib.parse.urlsplit(target).query
        return [(key, value) for key, value in urllib.parse.parse_qsl(query, keep_blank_values=True)
                if key in params and not os.path.isabs(value)]
    return [] if os.path.isabs(target) else [("target", target)]


def check_target_paths(target):
    """Raise CommandError for a target address with a relative path in it."""
    bad = relative_paths(target)
    if bad:
        what, path = bad[0]
        name = "target" if what == "target" else "%s= in target" % what
        raise CommandError(
            "%s: relative path '%s' is not accepted: the server's working directory (%s) is "
            "not the caller's; give an absolute path" % (name, path, os.getcwd()))
