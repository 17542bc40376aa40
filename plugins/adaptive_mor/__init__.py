"""Built-in plugin: Mixture-of-Recursions routers, KV policies and capacity schedules."""
