"""Settings: the option table, the parsers, the Settings object and the TOML file."""
