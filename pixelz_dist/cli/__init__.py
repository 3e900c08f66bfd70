"""The command line: options shared by the commands, TOML configuration files, building the model, data, optimizer
and scheduler from them, resolving ``module:factory`` specs, and the built-in demo."""
