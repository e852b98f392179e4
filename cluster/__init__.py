"""graft.cluster: Ray driver, actors and the CLI."""
