"""Top-to-bottom training recipes; each module has `main(argv)` for the `postax` command."""
