import sys

from streamflow.cli import main

sys.exit(main())
