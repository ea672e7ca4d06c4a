"""jobctl's --version text, read from the installed package metadata when asked for."""

import importlib.metadata


def version_text():
    """ "jobctl 0.1.0 (qemu.qmp 0.0.6)": this package's and its QMP library's versions."""
    return f"jobctl {_own_version()} (qemu.qmp {_distribution_version('qemu')})"


def _own_version():
    """This project's version (distribution overlay-nbd, whatever name jobctl is imported by)."""
    try:
        return importlib.metadata.version("overlay-nbd")
    except importlib.metadata.PackageNotFoundError:
        return "(version unknown: not installed)"


def _distribution_version(package):
    """The version of the installed distribution providing a top-level package."""
    top = package.partition(".")[0]
    for name in importlib.metadata.packages_distributions().get(top, ()):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "(version unknown: not installed)"
