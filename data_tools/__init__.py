"""Turn image-caption collections into WebDataset tar shards (img2dataset layout)."""
