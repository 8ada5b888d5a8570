"""Built-in model adapters, registered through the ``hicache`` entry-point group like any plugin."""
