"""`python tests/kill_at_write.py PATTERN [overrides]`: `python -m icm_lab [overrides]` that dies
(SIGKILL) the moment a file whose final path matches PATTERN has been written under its
temporary name and is about to be renamed into place: the worst moment to be killed. The
reliability tests' fault injection, kept out of the package."""

import fnmatch
import os
import runpy
import signal
import sys

pattern = sys.argv.pop(1)
_replace = os.replace


def replace_or_die(src, dst, *args, **kwargs):
    if fnmatch.fnmatch(str(dst), pattern):
        os.kill(os.getpid(), signal.SIGKILL)
    return _replace(src, dst, *args, **kwargs)


os.replace = replace_or_die  # every atomic write (icm_lab.io.files.atomic) ends in os.replace
sys.argv[0] = "icm_lab"
runpy.run_module("icm_lab", run_name="__main__", alter_sys=True)
