"""The command line's entry: parse (sockmap.cli.parser), run the command's handler, print
its error. Only this exits.

Exit codes: 0 ok, 1 "found something" (conflicts) or a timeout (wait), 2 error (bad input,
failed operation); ``sockmap.cli`` has their names.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from sockmap.cli import EXIT_ERROR
from sockmap.cli.parser import COMMANDS, build_parser
from sockmap.errors import SockmapError


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    command: list[str] | None = None
    if "--" in words:
        cut = words.index("--")
        words, command = words[:cut], words[cut + 1 :]
    # the command is the first word that is not an option (the top level takes no values)
    name = next((w for w in words if not w.startswith("-")), None)
    parser = build_parser(name if name in COMMANDS else None)
    args = parser.parse_args(words)
    if getattr(args, "takes_command", False):
        args.cmd = command or []
    elif command is not None:
        parser.error("'--' is only for `sockmap guest exec NAME -- CMD`")
    if getattr(args, "logs", True):
        from sockmap import logs

        logs.setup(args.log_level)  # one line per event on stderr (journald-friendly)
    try:
        rc: int = args.handler(args)
    except SockmapError as e:
        print(f"sockmap: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
