"""The bottom layer: errors, options, serialisation, prompts, loading, metrics, engines, figures.

Nothing here imports from patching.io, patching.analyses, patching.study or the CLI."""
