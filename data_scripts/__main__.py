"""`python -m data_scripts ...` is `python -m data_scripts.crohme ...`: prepare the CROHME splits."""

import sys

from data_scripts.crohme import main


if __name__ == "__main__":
    sys.exit(main())
