"""Allocators: kept counts (and value widths) per weight from curves or scores."""
