"""Run folders: their files and rules (folder.py), the settings a run resolves once
(settings.py), its objects (build.py), and loading a run back (load.py)."""
