"""Training memory models and others: `lensbench fit`."""
