"""Process plumbing under every layer: no data, no models, no torch at import where avoidable.

errors (the exception family and its exit codes), settings (a setting declares its option and
check), progress (the Reporter the library reports through), device, distributed (torchrun),
allocator (glibc malloc tuning), text (one clean line of untrusted text). Imports nothing of
mctool outside core (tests/test_imports.py).
"""
