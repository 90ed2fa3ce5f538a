"""The operator's console: the admin services the admin API, the CLI and the dashboard share."""
