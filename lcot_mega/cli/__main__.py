"""`python -m lcot_mega.cli ...` is `lcot-mega ...`."""

import sys

from lcot_mega.cli.main import main

sys.exit(main())
