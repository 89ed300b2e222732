"""A plug-in whose import never ends (say, on a stuck network share): a worker loading it never reads
its first task."""

import time

time.sleep(600)
