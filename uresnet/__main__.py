"""``python -m uresnet`` / ``torchrun --nproc_per_node=N -m uresnet train ...``."""
import sys

from uresnet_models.cli import main

if __name__ == "__main__":
    sys.exit(main())
