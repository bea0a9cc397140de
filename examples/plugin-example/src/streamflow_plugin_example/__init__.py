"""An example streamflow plugin package (see docs/writing-a-connector.md)."""
