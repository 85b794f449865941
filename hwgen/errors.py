"""The one exception type the CLI turns into a clean message and a non-zero exit."""


class UserError(Exception):
    """A problem with the user's input (a file, an option, a dataset) rather than a bug in hwgen.

    The message names the file or field at fault and what to do about it; the CLI prints it
    without a traceback.
    """
