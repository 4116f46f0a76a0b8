"""The data path: a data file's rows to masked rows (ids and labels), with counts and a cache.

``pipeline`` reads, templates and masks rows through the components it is given; ``prepare`` builds
those components from the config and loads a tokenizer (no model); ``cache`` keeps prepared rows on
disk; ``jsonstream`` and ``workers`` serve readers and batch masking. Nothing here imports torch or
knows a component by name.
"""
