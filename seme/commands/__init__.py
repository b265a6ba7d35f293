"""CLI subcommands. Each module: ``register(sub)`` (stdlib only) and ``run(args) -> int``."""
