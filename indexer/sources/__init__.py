"""What yields work: `scan` (folders → file entries), `shards` (WebDataset tar shards → samples), `watch`
(filesystem events → complete-file changes).
"""
