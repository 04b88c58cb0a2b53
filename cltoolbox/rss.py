"""Peak resident memory of one run, not of the process that happens to run it.

``ru_maxrss`` is the process's peak since it started, and it even carries the peak of the process that forked
it across ``exec``: a sweep worker's second run, or a run started by a large parent, reported someone else's
peak. On Linux the peak (``VmHWM``) can be reset to the current resident size, so each run measures its own.
"""

from __future__ import annotations

import resource


def reset_peak() -> None:
    """Start a new peak at the current resident size (Linux >= 4.0; elsewhere the process's peak is kept)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_mb() -> float:
    """The resident-size peak since the last :func:`reset_peak` (since the process started where unsupported)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux, the process's peak


def children_peak_mb() -> float:
    """The largest peak of any child process waited for (loader workers), pages shared with this one included."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
