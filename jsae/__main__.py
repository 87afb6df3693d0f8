import sys

from jsae.cli import main

sys.exit(main())
