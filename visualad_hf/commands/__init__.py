"""The `visualad` commands: one module per command, each with `add_arguments(parser)` and `run(args) -> int`.

These modules hold argument parsing and printing only; the work is done by library code outside this package.
Shared flags (one spelling each, old spellings as deprecated aliases) come from `_flags`.
"""
