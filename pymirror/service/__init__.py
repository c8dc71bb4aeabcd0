"""The pymirror service: a daemon that holds pairs (daemon.py), its control
protocol (protocol.py, verbs.py, control.py) and its Python client
(client.py).  See docs/service.md and docs/control.md."""
