"""The ``lethe`` command line (`cli.main`), above every layer: it serves, evaluates (`evals`) and builds the demo
model (`demo`); nothing below imports it."""
