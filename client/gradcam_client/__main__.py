"""`python -m gradcam_client` is `gradcam`."""

import sys

from .cli import main

sys.exit(main())
