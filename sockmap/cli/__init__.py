"""The command line (``sockmap ...``): parse, build a request, ask the daemon or run a
command, print. Only this package exits; each command imports only what it needs, so
``sockmap ls`` starts fast.
"""
