"""pvpy: a PID-1 container supervisor for embedded Linux devices.

Signed state revisions, content-addressed objects, containers under crun,
atomic A/B updates with rollback. See README.md.
"""

__version__ = "0.1.0"
