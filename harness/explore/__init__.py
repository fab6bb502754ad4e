"""A property-based scenario explorer: Hypothesis stateful testing against real QEMU."""
