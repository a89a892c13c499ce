"""The many-model router: one HTTP server in front of one worker process per resident model.

The `model` field of a request (or `?model=`) picks the model; a model loads on its first request,
at most `--models-max` stay resident (the least recently used idle one is unloaded first), and each
runs the single-model server (api/app.py) in its own process on a private Unix socket, to which the
router forwards requests unchanged. See api/router/manager.py for the lifecycle and why processes.
"""
