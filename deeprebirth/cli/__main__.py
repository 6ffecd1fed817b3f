"""``python -m deeprebirth.cli``: the command line without the installed ``deeprebirth`` script."""

from deeprebirth.cli import main

main()
