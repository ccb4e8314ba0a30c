"""Operations on what the store holds: `dedup` (groups and file actions), `cluster`, `export` (Parquet and back),
`report` (HTML contact sheets), `jobs` (the review page's background jobs).
"""
