#!/usr/bin/env python3
"""p2pchat tracker, with the original server.py's command line (see --help).

A thin wrapper: everything lives in the installed package, `p2pchat.server`.
"""

import sys

try:
    from p2pchat.server import main
except ImportError as err:
    sys.exit(f"server.py: the p2pchat package is not installed ({err}); run: pip install .")

if __name__ == "__main__":
    sys.exit(main())
