"""The engine room: torch helpers that ``pipeline.Engine`` runs on the objects it owns.

``loading`` (the Lightning recipe: from files to modules), ``decode`` (latents to checked
images), ``safety`` (the checker's verdicts), ``compiler`` (``torch.compile`` and its cache).
None of them holds state; ``pipeline`` is the only module that keeps torch objects.
"""
