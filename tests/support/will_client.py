"""A separate process that connects to a broker with a Last Will, then idles until killed.

``python -m tests.support.will_client HOST PORT CLIENT_ID WILL_TOPIC WILL_PAYLOAD
KEEPALIVE_S`` prints ``CONNECTED`` once the broker accepted it; a test waits for that line,
kills the process with SIGKILL and expects the will at a subscriber.
"""

from __future__ import annotations

import sys
import threading

from tests.support.mqtt_client import RecordingClient, Will


def main(argv: list[str]) -> int:
    """Connect with the will, announce it on stdout, and block until killed."""
    host, port, client_id, topic, payload, keepalive = argv
    client = RecordingClient(
        host,
        int(port),
        client_id,
        will=Will(topic, payload.encode(), qos=1, retain=False),
        keepalive=int(keepalive),
    )
    client.connect()
    print("CONNECTED", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
