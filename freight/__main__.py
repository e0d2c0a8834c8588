import sys

from freight.cli.main import main

sys.exit(main())
