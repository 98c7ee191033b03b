"""Renderings of an audit: JSON (the data) and the terminal view."""
