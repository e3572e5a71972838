"""Test helpers that start real outside programs (sshd, tmux) and stop them by PID."""
