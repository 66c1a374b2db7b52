"""The API's concepts without torch: options, their defaults, limits and validation, layer tables, presets,
the coarse-to-fine schedule, the proto<->options mapping. The client, the engine and the server all read
them from here."""

# The version of both distributions, stylize-client and stylize-server (their pyproject.toml read it).
__version__ = "0.1.0"
