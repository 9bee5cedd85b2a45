"""Figures (matplotlib) and the self-contained HTML / Markdown report of a run."""
