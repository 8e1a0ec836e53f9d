"""The `moequant` command: main.py holds the parser and the entry point, one module per command."""
