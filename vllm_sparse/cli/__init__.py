"""`vllm-sparse` command line: validate a config, print a model's plan, export the JSON schema."""
