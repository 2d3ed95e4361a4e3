"""Exceptions that carry a message meant for the user (the CLI prints them without a traceback)."""


class CatsdogsError(Exception):
    """Base class: bad input, bad configuration, or an environment problem the user can fix."""


class DataError(CatsdogsError):
    """The data directory or one of its files is missing or unusable."""


class PluginError(CatsdogsError):
    """A plugin failed to load or register, or two plugins clash."""


class ConfigError(CatsdogsError):
    """A parameter or configuration value is out of range or unknown."""
