"""
Errors a user can act on.
"""


class ConfigError(Exception):
    """
    A configuration problem (an option missing, a file unreadable or
    unusable).  Its message is one line, shown to the user as is: it says
    which thing is wrong and why.
    """
