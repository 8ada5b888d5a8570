"""Built-in bases and policies, registered through the ``hicache`` entry-point group like any plugin."""
