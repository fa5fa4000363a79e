"""The ``dreamteacher`` subcommands: thin Click commands, each loading the config and calling one function."""
