"""`python -m optcli.llm.child PEAK_FILE MODULE ARGS...`: run MODULE as `python -m MODULE ARGS...` would, and write
the process's peak resident memory (VmHWM, bytes) to PEAK_FILE at exit.

Why not the kernel's ru_maxrss from wait4: Linux carries the parent's high-water mark into the child at exec, so
a child of a 450 MB optcli reports at least 450 MB whatever it did itself. VmHWM belongs to the child's own memory.
"""

from __future__ import annotations

import atexit
import runpy
import sys
from pathlib import Path


def main() -> None:
    peak_file, module, *args = sys.argv[1:]

    def write_peak():
        from optcli.llm.memory import peak_rss_self

        Path(peak_file).write_text(str(peak_rss_self()))

    atexit.register(write_peak)
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
