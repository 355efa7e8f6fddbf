"""The agent's local inference server: OpenAI-compatible HTTP on a Unix socket.

:mod:`.scheduling` is the pure core (admission, FIFO queue, deadlines), :mod:`.runner` drives
it with worker threads, :mod:`.holder` keeps the active model, :mod:`.app` is the HTTP API,
:mod:`.metrics` the Prometheus figures and :mod:`.listeners` the sockets and peer credentials.
"""
