"""``python -m analogllm`` runs the command-line interface (same as the ``analogllm`` script)."""

from analogllm.cli import main

raise SystemExit(main())
