"""The pymirror service (docs/service.md, docs/control.md).

- ``daemon.py``: the daemon (:func:`daemon.run`), its verbs and its registry of pairs and groups;
- ``held.py``: one pair as the daemon holds it (watcher, online verify);
- ``barrier.py``: group commands at one instant under the I/O barrier;
- ``state.py``: the state directory (pairs and groups remembered across restarts);
- ``control.py``: the control socket (binding, one thread per client, event queues);
- ``protocol.py``, ``verbs.py``: framing, messages, error classes; the verbs and their arguments;
- ``events.py``: events logged, kept per pair and sent to subscribers;
- ``client.py``: :func:`pymirror.connect` and the Python client;
- ``paths.py``: default control socket and state directory.
"""
