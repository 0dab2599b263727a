from healthcheck.cli import entry_point

entry_point()
