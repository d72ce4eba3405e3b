"""Choosing what to cut: search over layer plans for a budget (`surgery search`)."""
