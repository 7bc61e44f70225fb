"""`python -m mtllm_locally.bench <section> [--json]`: measured, side-by-side figures.

Each section runs ours and the alternative in the same invocation (the alternative in
its own process when loading both libraries together would be unsafe) and reports
ratios; warm-up is excluded from every timing.
"""
