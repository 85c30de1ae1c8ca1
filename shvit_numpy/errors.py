"""The one exception type of the project.

Every problem a user can cause (a bad file, a wrong input, an unknown option) raises
``ShvitError`` with a one-line message that says what was wrong and what was expected.
The command-line programs print that line and exit with status 2; nothing else should
ever reach the user as a traceback.
"""


class ShvitError(ValueError):
    """A user-facing error: ``str(err)`` is one line naming the problem and the expectation."""
