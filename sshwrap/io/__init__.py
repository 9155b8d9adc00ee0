"""The IO layer: the only code that touches fds, sockets, threads, ptys and child processes.

- :mod:`.mux_control`: a client of the ControlMaster's mux socket (hello, alive check,
  forwards, proxy mode);
- :mod:`.pump`: the pump thread that carries session channels over the proxy socket;
- :mod:`.prompts`: the askpass server that answers ssh's prompts over a private socket;
- :mod:`.threads`: starting daemon threads with signals blocked.

Nothing here decides policy (timeouts, retries, results): that is :mod:`sshwrap.core`.
"""
