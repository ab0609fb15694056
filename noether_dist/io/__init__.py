"""Bytes and tensors on storage: the fsspec storage interface, DCP and consolidated artifacts behind one format interface, state dicts, node-local mirrors."""
