"""Built-in recipes (YAML), installed as the package ``analogllm.recipes``."""
