import sys

from invariant.cli import main

sys.exit(main())
