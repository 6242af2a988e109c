"""Model execution: the Runner interface, its engines and the pool that owns them."""
