"""``graft``'s commands, one module per family; each module's ``register(sub)`` adds its commands
(their flags and handlers) to the top-level parser, so a new command touches its family's file only.

    jobs.py      run, diff, plan, schema: a job from its spec
    outputs.py   verify, report, push, clean: a committed output; inspect: any checkpoint

``FAMILIES`` is the order ``graft --help`` lists them in.
"""
from __future__ import annotations

from graft.cluster.commands import jobs, outputs

__all__ = ["FAMILIES"]

FAMILIES = (jobs, outputs)
