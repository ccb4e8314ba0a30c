"""Files → pixels: `image` (one file → Decoded | Failure, never raises per file), `pool` (worker processes),
`shm` (shared-memory slots for the pixels), `mixed` (CPU pool + nvJPEG), `nvjpeg` (the GPU decoder).
"""
