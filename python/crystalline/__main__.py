"""`python -m crystalline` runs the command line."""

from crystalline.cli import main

main()
