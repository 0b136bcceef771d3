"""A free loopback port for tests that start a server or torchrun (shared by serve and train tests)."""

import socket


def free_port() -> int:
    """A port nothing listens on now; the caller binds it soon (and retries if another process wins)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
