"""`ai-server`: the command line for people (serve, pull, run, list, ps, show, rm, cp, jobs).

Client commands talk to a running server over its HTTP API only; they never import the server's
modules, so the command starts fast and works against a server on another machine.
"""
