"""Client library and `stylize` CLI for services that call the stylize API. Imports without torch."""
