"""The core layer: procedures written once, for the sync and the async faces.

- :mod:`.argv`: the ssh argv and the remote command line (quoting, ``env``/``cwd``, settings);
- :mod:`.sshparse`: ssh's own command-line grammar (which options take a value);
- :mod:`.channel_run`: running a command on a session channel of the pump.

It uses :mod:`sshwrap.io` and :mod:`sshwrap.protocol`; the faces above it use it.
"""
