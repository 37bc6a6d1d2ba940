"""`python -m service`: the headserve command line."""

import sys

from service.cli import main

sys.exit(main())
