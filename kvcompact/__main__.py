"""``python -m kvcompact <command>``: see :mod:`kvcompact.cli`."""

from kvcompact.cli import main

raise SystemExit(main())
