"""The one exception type for problems a user can fix (bad input, wrong file, wrong setup)."""


class ScbertError(Exception):
    """A problem with the user's input or setup; its message names the problem and the fix in one sentence.

    Scripts turn it into `error: <message>` on stderr and exit code 2 (see `utils.run_cli`).
    """
