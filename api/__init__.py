"""The API's concepts without torch: options, their defaults, limits and validation, layer tables, presets,
the coarse-to-fine schedule. The client, the engine and the server all read them from here."""
