"""Entry points: the command line, the stage runner, config validation and replay."""
