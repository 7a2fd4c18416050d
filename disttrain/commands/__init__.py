"""Subcommands of the `disttrain` CLI (ckpt, status, plot): one module each."""
