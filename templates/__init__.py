"""Jinja2 templates of the HTML audit report (package data)."""
