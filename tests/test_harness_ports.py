"""The cluster harness's ports (tests/harness.py): never the same port twice, never one from the
kernel's ephemeral range (where any process binding port 0 can take it before the Ray or MLflow
process it was meant for binds it: CI once lost a worker node that way)."""

from __future__ import annotations

import socket

from tests.harness import _PORT_FLOOR, _ephemeral_low, free_port


def test_ports_are_distinct_free_and_below_the_ephemeral_range():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(_PORT_FLOOR <= p < max(_PORT_FLOOR + 100, _ephemeral_low()) for p in ports)
    with socket.socket() as s:  # handed out means bindable at the time
        s.bind(("", ports[-1]))


def test_a_port_in_use_is_skipped(monkeypatch):
    import tests.harness as harness

    with socket.socket() as held:
        for port in range(_PORT_FLOOR, _PORT_FLOOR + 1000):
            if port in harness._handed_out:  # skipped for that reason already: not what is tested
                continue
            try:
                held.bind(("", port))
                break
            except OSError:
                continue
        held.listen()
        # the search starts at the held port: it must move past it
        monkeypatch.setattr(harness.secrets, "randbelow", lambda n: port - _PORT_FLOOR)
        assert free_port() != port
