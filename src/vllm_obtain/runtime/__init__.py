"""An engine in a child process: the typed wire between the two (wire.py), the child's main
(child.py, the only part that learns backends) and the supervisor that starts, watches and
restarts it (supervisor.py)."""
