"""Built-in device profiles (YAML), installed as the package ``analogllm.profiles``."""
