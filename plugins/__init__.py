"""astkit's built-in plugins: the five AST techniques and the ``ast`` preset.

Installed as the package ``astkit_plugins`` and registered through the
``astkit`` entry-point group, exactly like a third-party plugin.
"""
