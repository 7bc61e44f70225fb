"""The learning loop: captured calls (state/) become adapters. dataset -> trainer ->
export -> gate -> registry (state/), started by the trigger, run by the worker.

learn/ never imports serve/: the two loops meet at the store (state/), and are wired
together in one place (wiring.py)."""
