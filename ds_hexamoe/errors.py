"""The one configuration error; :mod:`ds_hexamoe.config` re-exports it (docs/design.md, "Layer order").

It lives apart from ``config`` so that ``devices`` (the device type ``config`` parses entries with) can
raise it without an import cycle.
"""


class ConfigError(ValueError):
    """A configuration value is wrong; the message names the key and the fix."""
