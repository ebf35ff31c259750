"""One module per subcommand: parse → config → one library call → render. `mctool.cli.app`
registers them; they never import it."""
