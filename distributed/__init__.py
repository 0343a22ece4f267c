"""How noisymix runs on many workers: WebDataset shards, the Ray Train loop, checkpoints."""
