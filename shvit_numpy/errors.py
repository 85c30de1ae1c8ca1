"""The one exception type of the project.

Every problem a user can cause (a bad file, a wrong input, an unknown option) raises
``ShvitError`` with a one-line message that says what was wrong and what was expected.
The command-line programs print that line and exit with status 2; nothing else should
ever reach the user as a traceback.
"""


class ShvitError(ValueError):
    """A user-facing error: ``str(err)`` is one line naming the problem and the expectation."""


def first_line(e: BaseException, limit: int = 200, named: bool = False) -> str:
    """The first line of ``e``'s message, at most ``limit`` characters (its type's name when it has
    none; ``named``: always after it, "OSError: ..."): how a foreign error (torch, tinygrad, a zip or
    pickle reader, a runtime in the bench) is quoted inside one line of our own."""
    lines = str(e).strip().splitlines()
    if not lines:
        return type(e).__name__
    return f"{type(e).__name__}: {lines[0][:limit]}" if named else lines[0][:limit]


class TrainingError(Exception):
    """A training run cannot go on (a non-finite loss or gradient): one line, exit status 1."""
