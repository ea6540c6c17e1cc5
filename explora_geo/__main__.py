"""``python -m explora_geo`` runs the CLI."""

import sys

from explora_geo.cli import main

sys.exit(main())
