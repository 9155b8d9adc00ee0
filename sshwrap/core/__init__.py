"""The core layer: procedures written once, for the sync and the async faces.

A procedure is a generator that yields what it waits for; :mod:`.waiting` has the waits and
the two drivers (``run_sync`` for the sync faces, ``run_async`` for :mod:`sshwrap.aio`).

- plain ssh: :mod:`.ssh_run` (``run``: start, communicate, exit, timeout stop, result),
  :mod:`.invocation` (one ssh call's argv, ``-E`` log, exit, the remote stop),
  :mod:`.child_steps` (procedures over a child's pipes and exit), :mod:`.tty_process` (ssh -tt
  in a local pty for the process faces), :mod:`.sudo` (``sudo=True``: the prompt, the
  password on stdin, ``SudoError``), :mod:`.getoutput` (``getoutput``/``getstatusoutput``);
- over a ControlMaster: :mod:`.commands` (retry once on a lost master, the ``ssh -S``
  fallback), :mod:`.session` (open a session with the MaxSessions wait; run on a channel with
  timeout -> TERM -> KILL -> close; one cleanup on Ctrl-C and cancel), :mod:`.channel_streams`
  (the local ends of a channel's streams), :mod:`.channel_popen` (``Popen`` on a channel),
  :mod:`.shell` (a persistent remote shell on one channel), :mod:`.spawn_command` (the command
  line of a ``Spawned``);
- fan-out: :mod:`.fanout_run` (the scheduler), :mod:`.batches` (rolling batches, ``max_fail``
  and canaries: pure), :mod:`.fanout_host` (one host's bounds, stop,
  retries and sudo), :mod:`.host_timers` (the hosts' timers),
  :mod:`.fanout_warm` (hosts over persisted masters: channels, no ssh),
  :mod:`.host_result` (``HostResult``), :mod:`.hostset` (host ranges and groups: pure),
  :mod:`.host_input` (hosts from patterns, files, groups), :mod:`.many_output` (``sshwrap-many``'s
  output), :mod:`.fleet_copy` (``put_many``/``get_many``), :mod:`.per_host` (``%h`` and
  per-host commands: pure),
  :mod:`.gateway_run`, :mod:`.gateway_agent` and :mod:`.gateway_wire` (the fan-out through
  gateways: the control side, the agent on a gateway, the JSON lines between them),
  :mod:`.gateway_waves` (rolling batches through gateways);
- shared: :mod:`.options` (the keyword lists, typed), :mod:`.completed` (``CompletedProcess``),
  :mod:`.argv` (the ssh argv and the remote command line), :mod:`.sshparse` (ssh's own
  command-line grammar).

It uses :mod:`sshwrap.io` and :mod:`sshwrap.protocol`; the faces above it use it.
"""
