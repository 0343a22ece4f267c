"""The user's door: config, data preparation, the `noisymix` command, reports."""
