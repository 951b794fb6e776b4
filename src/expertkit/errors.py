"""The one exception type for failures a user can cause and fix.

The CLI prints its message on one line and exits non-zero, so every message
names the thing that is wrong and what to do about it.
"""


class ExpertkitError(Exception):
    """A user-fixable problem: bad config, bad data, wrong base, corrupted file."""
