"""The errors the CLI turns into one line for the user instead of a traceback."""


class UserError(Exception):
    """Bad input the user can fix; the message names the file, field or URI. The CLI prints it."""


class ConfigError(UserError, ValueError):
    """A config file or override that does not match the schema."""


class DatasetError(UserError, ValueError):
    """Data that does not match the contract or its manifest; the message names the URI and field."""
