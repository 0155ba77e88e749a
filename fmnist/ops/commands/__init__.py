"""`fashion-mnist`'s subcommands, in groups: each module adds its commands to the parser and runs them."""
