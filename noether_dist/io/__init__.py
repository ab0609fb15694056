"""Bytes and tensors on storage: the fsspec storage interface, DCP and single-file artifacts, state dicts, node-local mirrors."""
