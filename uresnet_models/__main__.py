"""``python -m uresnet_models ...`` runs the ``uresnet`` command line."""
import sys

from .cli import main

sys.exit(main())
