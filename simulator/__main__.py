"""`python -m simulator`: the same as `swarmdesk simulator`."""

from simulator.cli import main

main()
