"""Many runs at once: YAML batches, studies with statistics and shards, and merging shards.

Generic over the analyses' registry: nothing here knows which analysis runs."""
