"""The ``indexer`` command: `main` parses, builds the settings once and maps errors to exit codes; one module per
capability registers its subcommands (``core``, ``watch``, ``serve``, ``library``, ``distributed``).
"""
