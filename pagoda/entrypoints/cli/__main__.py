"""`python -m pagoda.entrypoints.cli` = the `pagoda` command."""
import sys

from pagoda.entrypoints.cli import main

sys.exit(main())
