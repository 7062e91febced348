"""`vllm-sparse calibrate`: measure candidate estimators and budgets on a model's own attention, pick a plan."""
