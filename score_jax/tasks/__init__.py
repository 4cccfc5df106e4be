"""Task families: problems, prompts and binary rewards."""
