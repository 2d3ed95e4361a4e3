"""Built-in components, registered through the same plugin hooks as third-party ones."""
