"""The peer stream processors' apps (run with .venv-peers' python) and the harness running them."""
