"""The `faceveil` command line: thin absl layers over the library calls."""
