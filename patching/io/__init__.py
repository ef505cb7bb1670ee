"""Input and output: the output policy (files), strict YAML, the HTML pages' rendering.

Imports only go down, to patching.core; nothing here knows an analysis."""
