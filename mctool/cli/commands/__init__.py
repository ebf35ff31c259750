"""One module per subcommand: parse → config → one library call → render. `mctool.cli.application`
registers them; they never import it."""
