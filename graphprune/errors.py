"""The one base class of errors a user can fix (bad input, infeasible target, unsafe output).

The CLI prints any `UserError` as one line and exits 2; any other exception is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """Something in the user's input or environment is wrong; the message says what and where."""
