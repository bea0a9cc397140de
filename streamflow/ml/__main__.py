"""``python -m streamflow.ml FD``: a model worker process serving the connection on FD."""

import sys
from multiprocessing.connection import Connection

from streamflow.ml.host import serve

serve(Connection(int(sys.argv[1])))
