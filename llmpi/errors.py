"""User-facing errors: one readable line, exit code 2, the same on every rank.

Anything a user can get wrong (a config key, a data file, a checkpoint) raises
`UserError`. Entry points run under `llmpi.cli.run_main`, which prints the
message once (rank 0) and exits every rank with `EXIT_USER_ERROR`; any other
exception is a bug and aborts the whole MPI job with its traceback.
"""

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
