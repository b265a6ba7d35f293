import sys

from seme.cli import main

sys.exit(main())
