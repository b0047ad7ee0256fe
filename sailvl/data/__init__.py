"""Data: tokenizer (more of the pipeline arrives with the data issue)."""
