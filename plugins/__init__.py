"""medaudit's built-in plugins.

Each module here is an ordinary pluggy plugin, registered through the ``medaudit`` entry-point
group declared in ``pyproject.toml`` exactly as a third-party plugin would be.
"""
