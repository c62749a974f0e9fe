"""The one exception type that reaches a user as a message instead of a traceback."""


class MoefyError(Exception):
    """A problem with the user's input (config, file, model, dataset).

    The message must name what is wrong and how to fix it; step entry points print it
    on one line and exit with status 2.
    """
