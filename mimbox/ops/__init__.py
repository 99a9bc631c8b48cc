"""What an operator runs: the command line, the config file, the doctor."""
