"""`python -m gradcam_server` is `gradcam-server`."""

import sys

from .server import main

sys.exit(main())
