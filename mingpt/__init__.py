"""A from-scratch GPT-2 in the shape of minGPT, with a record/patch seam for activation patching."""
