"""``python -m lrp_cli``."""

from .cli import main

main()
