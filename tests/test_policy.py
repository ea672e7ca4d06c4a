"""The error-policy table: policy x operation x errno -> action, and io-status."""

import errno

import pytest

from plugin.core import policy

OTHER_ERRNOS = [errno.EIO, errno.EPERM, errno.ENOMEM, errno.EINVAL, errno.EROFS,
                errno.EDQUOT, errno.ESHUTDOWN, errno.ENOTCONN]

# The expected table, written out independently of plugin.policy's own:
# (policy, errno is ENOSPC) -> action.
EXPECTED = {
    ("report", True): "report", ("report", False): "report",
    ("ignore", True): "ignore", ("ignore", False): "ignore",
    ("stop", True): "stop", ("stop", False): "stop",
    ("enospc", True): "stop", ("enospc", False): "report",
    ("auto", True): "stop", ("auto", False): "report",
}


@pytest.mark.parametrize("operation", ["read", "write"])
@pytest.mark.parametrize("on_error", ["report", "ignore", "stop", "enospc", "auto"])
@pytest.mark.parametrize("error_errno", [errno.ENOSPC] + OTHER_ERRNOS)
def test_error_action_matches_qemu_table(on_error, operation, error_errno):
    expected = EXPECTED[(on_error, error_errno == errno.ENOSPC)]
    assert policy.error_action(on_error, operation, error_errno) == expected


def test_policies_are_qemu_blockdev_on_error_values():
    assert set(policy.POLICIES) == {"report", "ignore", "enospc", "stop", "auto"}


def test_every_action_is_a_known_action():
    actions = {policy.error_action(p, op, e) for p in policy.POLICIES for op in policy.OPERATIONS
               for e in [errno.ENOSPC, errno.EIO]}
    assert actions == set(policy.ACTIONS)


def test_io_status_is_nospace_for_enospc():
    assert policy.io_status_for(errno.ENOSPC) == "nospace"


@pytest.mark.parametrize("error_errno", OTHER_ERRNOS)
def test_io_status_is_failed_for_other_errors(error_errno):
    assert policy.io_status_for(error_errno) == "failed"


def test_unknown_policy_is_a_programming_error():
    with pytest.raises(ValueError):
        policy.error_action("retry", "read", errno.EIO)


def test_unknown_operation_is_a_programming_error():
    with pytest.raises(ValueError):
        policy.error_action("report", "flush", errno.EIO)
