"""Synthetic memorization datasets, their answer masks and the collators that train on them."""
