"""`python -m service`: the headserve command line."""

import sys

from service.cli import main

if __name__ == "__main__":  # (not when a worker process, spawned, imports this module as __mp_main__)
    sys.exit(main())
