"""``python -m examples.template_store [options]``: the same as ``ormcache demo``."""

from __future__ import annotations

import sys

from ormcache.demo import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
