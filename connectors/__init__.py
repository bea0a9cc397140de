"""Built-in connectors, registered through the same entry points third-party plugins use."""
