"""The one exception type for mistakes in user input: the CLI prints it as one line and exits 2."""


class UserError(Exception):
    """Bad input from the user (spec, paths, arguments): reported without a traceback, exit status 2."""
