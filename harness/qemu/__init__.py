"""One QEMU process and its QMP; which binaries are under test and what they can do."""
