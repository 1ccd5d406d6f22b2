#!/usr/bin/env python3
"""p2pchat client, with the original client.py's command line (see --help).

A thin wrapper: everything lives in the installed package, `p2pchat.client`.
"""

import sys

try:
    from p2pchat.client import main
except ImportError as err:
    sys.exit(f"client.py: the p2pchat package is not installed ({err}); run: pip install .")

if __name__ == "__main__":
    sys.exit(main())
