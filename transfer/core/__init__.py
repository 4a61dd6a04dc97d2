"""The bottom layer: errors and exit statuses, provenance, the preprocessing description, plots, log quieting.

Everything above may import it; it imports nothing else of ``transfer``.
"""
