"""`python train/train.py ...` does what `python -m train ...` does (for those who run the file)."""

import sys
from pathlib import Path

if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    # Run as a script, this folder is sys.path[0], where `train` would mean this file: put the
    # project root there instead, so `train` is the package.
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))
    from train.__main__ import entry

    entry()
