"""cli: the command line (``sockmap``, ``python -m sockmap.cli``): parse, build a frozen
request, call the module or the daemon, print. The only place that exits: 0 ok, 1 found
something (``conflicts``) or timed out (``wait``), 2 error (one line and a hint).

``ls``, ``conflicts``, ``events``, ``wait`` and ``guest attach`` are requests to the running
daemon over RUN_DIR/control.sock (``sockmap.control``: one JSON line each way, large
answers streamed); without one they say so and exit 2. ``guest create|delete|detach`` go
through the daemon when one runs and are done here otherwise; ``guest list|exec``,
``conflicts --flat``, ``agent``, ``token create`` and ``daemon`` need none. ``main`` runs
one command, ``parser`` builds only that command's grammar (a fast start), ``commands`` and
``guest`` hold the commands' bodies. ``lsview``
renders ``ls`` rows to the terminal width (no I/O); ``eventclient`` reads the ``events``
stream, and ``wait`` reads it until the guest's port accepts on the host; ``tokens`` writes
a VM's token file and prints the agent command to run in the VM.
"""

EXIT_OK, EXIT_FOUND, EXIT_ERROR = 0, 1, 2  # the exit codes (sockmap.cli.main)
