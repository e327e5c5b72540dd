"""`python -m icm_lab` and the `icm-lab` script (the command line itself is `icm_lab.app.cli`).

Importing torch, diffusers and Hydra takes seconds before anything else can happen, so this
module first says that the command has started, then imports the command line.
"""

from __future__ import annotations

import sys

# Arguments after which the command prints a text and exits (Hydra's help, config, shell
# completion): no start-up line in the way of what they print.
PRINT_ONLY = ("--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "-i",
              "--shell-completion", "-sc", "--version")


def main() -> None:
    if not any(arg.split("=")[0] in PRINT_ONLY for arg in sys.argv[1:]):
        print("icm_lab: starting (loading torch and diffusers, then checking the config)",
              flush=True)
    from icm_lab.app.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
