"""Benchmarks for ``batchnorm``: our modules against ``torch.nn``, measured in one process.

Run ``python -m benchmarks.bench_modules --help``; see ``benchmarks/README.md`` for how to read
the output.
"""
