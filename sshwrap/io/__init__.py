"""The IO layer: the only code that touches fds, sockets, threads, ptys and child processes.

Nothing here decides policy (how long to wait, whether to retry, what a result is): that is
:mod:`sshwrap.core`, which drives these pieces through its procedures.

- ControlMaster: :mod:`.master` (start, check, restart, stop; the proxy socket),
  :mod:`.attach` (masters sshwrap does not own: attach, detach, stop), :mod:`.persist`
  (masters that outlive a fan-out: their private directory, listing, closing),
  :mod:`.mux_control` (a client of the master's mux socket over :mod:`sshwrap.protocol.mux`),
  :mod:`.forwards` (port forwards and their restore after a restart);
- session channels: :mod:`.pump` (the pump thread that drives
  :mod:`sshwrap.protocol.channel` over the proxy socket), :mod:`.session` (a channel's handle
  and the channel errors), :mod:`.channel_io` (``Source``/``Sink``: where a channel's data
  comes from and goes to);
- local ssh children: :mod:`.ssh_child` (starting ssh with pipes, its pipes and exit on one
  waitable fd, its stderr relay), :mod:`.pty` (the one way a program starts on a new pty, as its
  controlling terminal, with no Python in the child), :mod:`.host_process`,
  :mod:`.child_start`, :mod:`.fd_watcher` and :mod:`.fd_budget` (one ssh per host of a
  fan-out, started and watched by the loop);
- SFTP: :mod:`.sftp_session` (the session over ``ssh -s sftp``, ``Abort``),
  :mod:`.sftp_errors` (the transfer errors), :mod:`.sftp_pipeline` (pipelined whole-file reads
  and writes), :mod:`.sftp_files` (the session pool and file operations of the fsspec
  filesystem);
- :mod:`.recording`: an asciicast recording of an interactive session, written as it goes
  through :mod:`.appendlog` (an append-only file in aligned blocks, ``O_DIRECT`` where it can);
- :mod:`.bundle`: the package as a zip, sent to a gateway's ``python3``;
- :mod:`.prompts`: the askpass server that answers ssh's prompts over a private socket;
- waiting: :mod:`.flags` (events a thread or an asyncio loop can wait on), :mod:`.deadline`
  (deadline arithmetic), :mod:`.threads` (background threads with signals blocked).
"""
