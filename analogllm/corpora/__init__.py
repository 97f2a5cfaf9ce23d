"""Built-in text shipped with analogllm (package data): ``shakespeare.txt``, the held-out evaluation text."""
