"""Shared test setup: the ``local_sshd`` fixtures come from sshwrap's pytest plugin."""
