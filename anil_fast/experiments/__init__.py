"""Experiments over the presets: compare.py (scenarios side by side), reproduce.py (the
papers' numbers), show.py (pictures of tasks)."""
