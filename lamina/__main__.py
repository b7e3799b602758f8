"""``python -m lamina``: the same as the ``lamina`` command."""

from lamina.cli.main import main

raise SystemExit(main())
