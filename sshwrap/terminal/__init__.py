"""The terminal side: the user's tty and the ptys sshwrap puts ssh in.

- :mod:`.modes`: raw mode, sizes, attributes of a terminal;
- :mod:`.relay`: the one poll loop between the user's terminal and ssh's pty;
- :mod:`.jobcontrol`: ``~^Z`` (suspending sshwrap with its ssh) for the drop-in command.
"""
