"""`python -m disttrain SUBCOMMAND ...` — the same as the `disttrain` console script."""

from disttrain.cli import main

raise SystemExit(main())
