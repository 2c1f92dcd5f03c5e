"""`python -m cifar_run` and the `cifar-run` command.

Hydra and torch take seconds to load: Ctrl-C is taken over before they load (interrupts.py), and
one while the command line's module loads is one line too, as everywhere else (cli.main).
"""

import signal
import sys

from cifar_run import interrupts


def main() -> None:
    interrupts.install()
    try:
        from cifar_run.cli import main as cli_main
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # first: see cli.main
        from cifar_run import exits

        print(f"cifar-run: interrupted; {exits.NOT_STARTED}", file=sys.stderr, flush=True)
        raise SystemExit(exits.EXIT_INTERRUPTED) from None
    cli_main()


if __name__ == "__main__":
    main()
