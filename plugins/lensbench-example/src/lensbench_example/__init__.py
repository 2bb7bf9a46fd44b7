"""An example lensbench plugin package (see docs/plugins.md)."""
