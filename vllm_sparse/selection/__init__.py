"""From block scores to the KV pages a kernel reads: budgets per row, then the block union."""
