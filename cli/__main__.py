"""`python -m cli`: the same command as the `ai-server` script."""

from cli.main import main

main()
