"""`python -m mctool` entry point (also used under torchrun)."""

from mctool.cli.launch import main

if __name__ == "__main__":
    main()
