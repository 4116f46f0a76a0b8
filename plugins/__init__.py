"""sftcore's built-in stages, each an ordinary plugin listed in registry.yaml."""
